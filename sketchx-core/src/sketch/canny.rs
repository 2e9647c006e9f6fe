//! OpenCV's Canny edge detector as `cv2.Canny(rgb, low, high)` runs it with its defaults (`apertureSize=3`,
//! `L2gradient=False`) on an 8-bit RGB image, reproduced from the algorithm's published facts:
//!
//! 1. Sobel 3x3 derivatives of every channel (`dx`: `[-1 0 1]` across, `[1 2 1]` down; `dy` transposed) with
//!    replicated borders, in integers;
//! 2. per pixel, the channel with the largest L1 magnitude `|dx| + |dy|` (the first such channel on ties) gives
//!    the magnitude and the gradient direction; outside the image the magnitude is 0;
//! 3. non-maximum suppression along the gradient quantised to 4 directions with OpenCV's fixed-point test
//!    (`tan(22.5°)` as `13573 / 2^15`): a pixel is a candidate when its magnitude is above `low` and greater than
//!    the neighbour before it along the direction and greater than or equal to the one after it (strictly
//!    greater than both on diagonals);
//! 4. hysteresis: every candidate above `high` is an edge, and so is every candidate 8-connected to an edge.
//!
//! The result is 255 on edges and 0 elsewhere. Thresholds compare with integer magnitudes (OpenCV floors them),
//! and a `low` above `high` is swapped, as OpenCV does.

/// `tan(22.5°)` in OpenCV's 15-bit fixed point: `(int)(0.41421356... * 2^15 + 0.5)`.
const TG22: i64 = 13573;
const SHIFT: u32 = 15;

/// The edge map (one byte per pixel: 255 edge, 0 not) of interleaved RGB8 pixels, `width * height * 3` bytes.
///
/// # Panics
/// If `rgb` is not `width * height * 3` bytes.
pub fn canny_rgb8(rgb: &[u8], width: u32, height: u32, low: u32, high: u32) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    assert_eq!(rgb.len(), w * h * 3, "RGB8 buffer size");
    let (low, high) = (i64::from(low.min(high)), i64::from(low.max(high)));
    let (mag, dx, dy) = gradients(rgb, w, h);
    let at = |x: isize, y: isize| -> i64 {
        if x < 0 || y < 0 || x as usize >= w || y as usize >= h {
            0
        } else {
            i64::from(mag[y as usize * w + x as usize])
        }
    };
    // 0: not an edge, 1: candidate, 2: edge.
    let mut state = vec![0u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let m = i64::from(mag[i]);
            if m <= low {
                continue;
            }
            let (xs, ys) = (i64::from(dx[i]), i64::from(dy[i]));
            let (ax, ay) = (xs.abs(), ys.abs() << SHIFT);
            let tg22x = ax * TG22;
            let (px, py) = (x as isize, y as isize);
            let maximum = if ay < tg22x {
                m > at(px - 1, py) && m >= at(px + 1, py)
            } else if ay > tg22x + (ax << (SHIFT + 1)) {
                m > at(px, py - 1) && m >= at(px, py + 1)
            } else {
                // Gradient along a diagonal: the neighbours above-left and below-right when dx and dy have the
                // same sign, above-right and below-left otherwise.
                let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                m > at(px - s, py - 1) && m > at(px + s, py + 1)
            };
            if !maximum {
                continue;
            }
            if m > high {
                state[i] = 2;
                stack.push(i);
            } else {
                state[i] = 1;
            }
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = (i % w, i / w);
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                let j = ny * w + nx;
                if state[j] == 1 {
                    state[j] = 2;
                    stack.push(j);
                }
            }
        }
    }
    state
        .iter()
        .map(|&s| if s == 2 { 255 } else { 0 })
        .collect()
}

/// Per pixel: the largest channel magnitude `|dx| + |dy|` and that channel's Sobel `dx`, `dy`.
fn gradients(rgb: &[u8], w: usize, h: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let px = |x: usize, y: usize, c: usize| i32::from(rgb[(y * w + x) * 3 + c]);
    let (mut mag, mut gx, mut gy) = (vec![0i32; w * h], vec![0i32; w * h], vec![0i32; w * h]);
    for y in 0..h {
        // Replicated borders: the row above the first is the first, and so on.
        let (up, down) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let (left, right) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let i = y * w + x;
            for c in 0..3 {
                let dx = px(right, up, c) + 2 * px(right, y, c) + px(right, down, c)
                    - px(left, up, c)
                    - 2 * px(left, y, c)
                    - px(left, down, c);
                let dy = px(left, down, c) + 2 * px(x, down, c) + px(right, down, c)
                    - px(left, up, c)
                    - 2 * px(x, up, c)
                    - px(right, up, c);
                let m = dx.abs() + dy.abs();
                if c == 0 || m > mag[i] {
                    (mag[i], gx[i], gy[i]) = (m, dx, dy);
                }
            }
        }
    }
    (mag, gx, gy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Vec<u8> {
        let mut v = Vec::new();
        for y in 0..h {
            for x in 0..w {
                v.extend([f(x, y); 3]);
            }
        }
        v
    }

    #[test]
    fn a_vertical_step_gives_one_column_of_edges() {
        // 0 left of x = 4, 200 from there: |dx| = 800 on columns 3 and 4; the first (m > left, m >= right)
        // keeps column 3 only.
        let img = grey(8, 6, |x, _| if x < 4 { 0 } else { 200 });
        let edges = canny_rgb8(&img, 8, 6, 100, 200);
        for y in 0..6 {
            for x in 0..8 {
                assert_eq!(edges[y * 8 + x] == 255, x == 3, "x {x} y {y}");
            }
        }
    }

    #[test]
    fn flat_images_and_thresholds_above_the_magnitude_give_no_edges() {
        let flat = grey(5, 5, |_, _| 77);
        assert!(canny_rgb8(&flat, 5, 5, 0, 0).iter().all(|&v| v == 0));
        let step = grey(8, 6, |x, _| if x < 4 { 0 } else { 200 });
        assert!(canny_rgb8(&step, 8, 6, 800, 800).iter().all(|&v| v == 0));
        // Swapped thresholds are put in order, as OpenCV does.
        assert_eq!(
            canny_rgb8(&step, 8, 6, 200, 100),
            canny_rgb8(&step, 8, 6, 100, 200)
        );
    }

    #[test]
    fn weak_edges_survive_only_when_connected_to_strong_ones() {
        // A step whose height changes along the rows: strong (|dx| = 800) at the top, weak (|dx| = 200) below;
        // the weak part survives because it is connected. `cv2.Canny(img, 150, 700)` (OpenCV 5.1) gives:
        let img = grey(8, 8, |x, y| match (x < 4, y < 4) {
            (true, _) => 0,
            (false, true) => 200,
            (false, false) => 50,
        });
        let want: [&str; 8] = [
            "...#....", "...#....", "...#....", "....####", "....#...", "...#....", "...#....",
            "...#....",
        ];
        let got = canny_rgb8(&img, 8, 8, 150, 700);
        for (y, row) in want.iter().enumerate() {
            let ours: String = (0..8)
                .map(|x| if got[y * 8 + x] == 255 { '#' } else { '.' })
                .collect();
            assert_eq!(&ours, row, "row {y}");
        }
        // The weak step alone is not above the high threshold anywhere.
        let weak = grey(8, 8, |x, _| if x < 4 { 0 } else { 50 });
        assert!(canny_rgb8(&weak, 8, 8, 150, 700).iter().all(|&v| v == 0));
    }

    #[test]
    fn one_pixel_images_work() {
        assert_eq!(canny_rgb8(&[1, 2, 3], 1, 1, 0, 0), vec![0]);
    }
}
