//! What a caller may ask for: [`GenerationRequest`], its defaults ([`GenerationRequest::DEFAULT`], those of the
//! original service), the allowed ranges (the `*_RANGE` constants, for help texts and API descriptions too) and
//! its validation, which names the offending field and the allowed range.

use std::sync::Arc;

use crate::error::{Error, Result, SketchError};
use crate::sampling::schedulers::{strength_begin_index, SchedulerKind, TimestepSpacing};
use crate::sketch::{CannyThresholds, Preprocess, Sketch};

/// The original service's fixed negative prompt, used when a request does not set one.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "lowres, bad anatomy, bad hands, cropped, worst quality";

/// Allowed `num_images`.
pub const NUM_IMAGES_RANGE: std::ops::RangeInclusive<u32> = 1..=8;
/// Allowed `steps`.
pub const STEPS_RANGE: std::ops::RangeInclusive<u32> = 1..=150;
/// Allowed `width` and `height` (also multiples of 8).
pub const SIZE_RANGE: std::ops::RangeInclusive<u32> = 64..=2048;
/// Allowed `width` and `height` are multiples of this.
pub const SIZE_MULTIPLE: u32 = 8;
/// Allowed `temperature`.
pub const TEMPERATURE_RANGE: std::ops::RangeInclusive<f64> = 0.0..=1.0;
/// Allowed `control_guidance_start` and `control_guidance_end` (the start also below the end).
pub const CONTROL_GUIDANCE_RANGE: std::ops::RangeInclusive<f64> = 0.0..=1.0;
/// Allowed `guidance_scale`.
pub const GUIDANCE_RANGE: std::ops::RangeInclusive<f64> = 0.0..=30.0;
/// Allowed explicit `controlnet_scale`.
pub const CONTROLNET_SCALE_RANGE: std::ops::RangeInclusive<f64> = 0.0..=5.0;
/// Allowed `eta`.
pub const ETA_RANGE: std::ops::RangeInclusive<f64> = crate::sampling::schedulers::ETA_RANGE;
/// Allowed `strength` (img2img; with a start image, `int(steps * strength)` must also be at least 1).
pub const STRENGTH_RANGE: std::ops::RangeInclusive<f64> = 0.0..=1.0;
/// Allowed `canny_low_threshold` and `canny_high_threshold` (the low one at most the high one). 2040 is the
/// largest L1 Sobel magnitude of an 8-bit image: above it nothing is an edge.
pub const CANNY_THRESHOLD_RANGE: std::ops::RangeInclusive<u32> = 0..=2040;
/// Allowed `clip_skip`: up to the 12 layers of SD1.5's text encoder (a model with fewer layers refuses more
/// than it has when the request is submitted).
pub const CLIP_SKIP_RANGE: std::ops::RangeInclusive<u32> = 0..=12;
/// Longest accepted prompt or negative prompt, in bytes (the text encoder reads 77 tokens; this only bounds work).
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

/// Which VAE decodes a request's final images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeKind {
    /// The model's own VAE (`"full"`): diffusers' `AutoencoderKL`, the reference.
    #[default]
    Full,
    /// The tiny VAE (`"tiny"`, TAESD: diffusers' `AutoencoderTiny`) loaded from
    /// [`EngineConfig::tiny_vae`](crate::engine::EngineConfig::tiny_vae): much faster, less detailed. A request
    /// for it on an engine without one is [`Error::InvalidRequest`] for the field `vae`.
    Tiny,
}

impl VaeKind {
    /// Every kind, in the order of help texts and API descriptions (the default first).
    pub const ALL: [VaeKind; 2] = [VaeKind::Full, VaeKind::Tiny];

    /// The request names of [`VaeKind::ALL`], in that order.
    pub fn names() -> [&'static str; 2] {
        Self::ALL.map(|k| k.as_str())
    }

    /// The request name: `"full"` or `"tiny"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            VaeKind::Full => "full",
            VaeKind::Tiny => "tiny",
        }
    }
}

crate::names::name_traits!(VaeKind, "vae", "VAE");

/// What img2img starts from instead of pure noise (diffusers' `StableDiffusionControlNetImg2ImgPipeline`): the
/// image is resized to the output size like the sketch, VAE-encoded and noised to the request's `strength`, while
/// the ControlNet still reads the preprocessed sketch. With the coloured sketch itself as the start image the
/// colours are kept and the ControlNet holds the lines.
#[derive(Clone, PartialEq, Eq)]
pub enum StartImage {
    /// The sketch itself (its colours, before preprocessing).
    Sketch,
    /// Another image, decoded like a sketch (transparency over white).
    Image(Arc<Sketch>),
}

impl StartImage {
    /// The name that asks for the sketch as the start image in text arguments (CLI, form fields).
    pub const SKETCH_NAME: &'static str = "sketch";

    /// Decodes an encoded image (PNG, JPEG, WebP, BMP or GIF, as [`Sketch::decode`]); an image that cannot be
    /// used is [`Error::InvalidRequest`] for the field `start_image`.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        match Sketch::decode(bytes) {
            Ok(image) => Ok(StartImage::Image(Arc::new(image))),
            Err(Error::InvalidSketch(e)) => Err(start_image_error(&e)),
            Err(e) => Err(e),
        }
    }

    /// Reads and decodes an image file; errors as [`StartImage::decode`] (an unreadable file too).
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::invalid(
                "start_image",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Self::decode(&bytes)
    }

    /// A text argument: [`StartImage::SKETCH_NAME`] (any ASCII case, surrounding whitespace ignored) for the
    /// sketch, otherwise the path of an image file ([`StartImage::open`]; a file named `sketch` is `./sketch`).
    /// For local users only: a server must never let a client name a path.
    pub fn from_arg(arg: &str) -> Result<Self> {
        if arg.trim().eq_ignore_ascii_case(Self::SKETCH_NAME) {
            Ok(StartImage::Sketch)
        } else {
            Self::open(std::path::Path::new(arg))
        }
    }

    /// The image to start from, given the request's sketch.
    pub fn image<'a>(&'a self, sketch: &'a Sketch) -> &'a Sketch {
        match self {
            StartImage::Sketch => sketch,
            StartImage::Image(image) => image,
        }
    }
}

impl std::fmt::Debug for StartImage {
    // Not the pixels: requests are printed in logs and test failures.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartImage::Sketch => f.write_str("Sketch"),
            StartImage::Image(i) => write!(f, "Image({}x{})", i.width(), i.height()),
        }
    }
}

/// Why a start image cannot be used, as an [`Error::InvalidRequest`] for `start_image` (the sketch's errors
/// speak of "the sketch").
fn start_image_error(e: &SketchError) -> Error {
    let message = match e {
        SketchError::Empty => "the image is empty (0 bytes)".to_string(),
        SketchError::UnknownFormat => {
            "unrecognised image format (expected PNG, JPEG, WebP, BMP or GIF)".to_string()
        }
        SketchError::Corrupt(m) => format!("the image could not be decoded: {m}"),
        SketchError::TooLarge {
            width,
            height,
            max_side,
            max_pixels,
        } => format!(
            "the image is too large: {width}x{height} pixels exceeds the limit of {max_side} pixels per side / \
             {max_pixels} pixels in total"
        ),
        SketchError::ZeroSized { width, height } => {
            format!("the image has no pixels ({width}x{height})")
        }
        other => other.to_string(),
    };
    Error::invalid("start_image", message)
}

/// Random seeds stay below 2^53 so that they survive a round trip through JSON numbers.
const RANDOM_SEED_BITS: u32 = 53;

/// A seed for requests that set none: random, below 2^53.
pub fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the operating system's random source is unavailable");
    u64::from_le_bytes(b) >> (64 - RANDOM_SEED_BITS)
}

/// One generation request. [`GenerationRequest::DEFAULT`] (also `Default`) gives the original service's defaults.
///
/// ```
/// use sketchx_core::request::GenerationRequest;
/// let req = GenerationRequest { prompt: Some("a red sports car".into()), seed: Some(42), ..Default::default() };
/// req.validate().unwrap();
/// assert_eq!(req.conditioning_scale(), 1.65 - 0.65);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// What the image should show. Empty or absent: the ControlNet works from the sketch alone (guess mode).
    pub prompt: Option<String>,
    /// What to steer away from; absent: [`DEFAULT_NEGATIVE_PROMPT`]; an explicit empty string: none.
    pub negative_prompt: Option<String>,
    /// How freely the image may depart from the sketch, in `[0, 1]`: the ControlNet's conditioning scale is
    /// `1.65 - temperature` (0.65 gives diffusers' default of 1.0).
    pub temperature: f64,
    /// Overrides the conditioning scale derived from `temperature`, in `[0, 5]`.
    pub controlnet_scale: Option<f64>,
    /// Classifier-free guidance strength in `[0, 30]`; `<= 1` turns guidance off (as in diffusers).
    pub guidance_scale: f64,
    /// Images to generate, `1..=8`.
    pub num_images: u32,
    /// Denoising steps, `1..=150`.
    pub steps: u32,
    /// Seed of the torch-compatible generator; absent: a random seed, reported in the result.
    pub seed: Option<u64>,
    /// Output width in pixels (multiple of 8, `64..=2048`); absent: derived from the sketch.
    pub width: Option<u32>,
    /// Output height in pixels (multiple of 8, `64..=2048`); absent: derived from the sketch.
    pub height: Option<u32>,
    /// The sampler.
    pub scheduler: SchedulerKind,
    /// How the sketch becomes the control image.
    pub preprocess: Preprocess,
    /// Forces guess mode on or off; absent: on exactly when the prompt is empty.
    pub guess_mode: Option<bool>,
    /// Fraction of the steps after which the ControlNet starts to act, in `[0, 1]`.
    pub control_guidance_start: f64,
    /// Fraction of the steps after which the ControlNet stops acting, in `[0, 1]`, greater than the start.
    pub control_guidance_end: f64,
    /// Overrides the model's `timestep_spacing` (as diffusers' `from_config(config, timestep_spacing=...)`);
    /// absent: the model scheduler config's (or the class default). `trailing` suits few-step sampling.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Stochasticity of the DDIM and TCD steps, in `[0, 1]` (diffusers' pipeline `eta`, which it passes to every
    /// scheduler step taking one); ignored by the other schedulers.
    pub eta: f64,
    /// Which VAE decodes the final images (default [`VaeKind::Full`]).
    pub vae: VaeKind,
    /// img2img: the image to start from ([`StartImage`]); absent: text-to-image from pure noise.
    pub start_image: Option<StartImage>,
    /// img2img: how far the start image is noised, in `[0, 1]` (diffusers' `strength`, default 0.8): the last
    /// `int(steps * strength)` of the `steps` scheduled steps run, from the start image noised to the first of
    /// them; 1 keeps nothing of the start image but its colours' statistics. Ignored without a start image.
    pub strength: f64,
    /// [`Preprocess::Canny`]'s lower threshold (`cv2.Canny`'s `threshold1`), `0..=2040`, at most the upper one.
    pub canny_low_threshold: u32,
    /// [`Preprocess::Canny`]'s upper threshold (`threshold2`), `0..=2040`.
    pub canny_high_threshold: u32,
    /// diffusers' `clip_skip`, in `0..=12` and at most the text encoder's layer count: the prompt is encoded by
    /// the hidden state this many layers before the last (through the final layer norm); 0 (the default, and
    /// diffusers' `None`) uses the last layer. A1111's "clip skip N" is `N - 1` here. As in diffusers, it
    /// applies to the prompt only: the negative prompt is always encoded by the last layer.
    pub clip_skip: u32,
}

impl GenerationRequest {
    /// The defaults, those of the original service: no prompt, the default negative prompt, temperature 0.65
    /// (ControlNet scale 1.0), guidance 7.5, one image, 30 steps, a random seed, the size from the sketch,
    /// `euler_a`, `scribble`, automatic guess mode, the ControlNet over all steps, the model's timestep spacing,
    /// `eta` 0, the full VAE, no start image (strength 0.8 when one is given), canny thresholds 100 and 200, no
    /// clip skip. A constant, so that bindings
    /// can use its fields where a constant is needed (`#[arg(default_value_t = GenerationRequest::DEFAULT.steps)]`).
    pub const DEFAULT: GenerationRequest = GenerationRequest {
        prompt: None,
        negative_prompt: None,
        temperature: 0.65,
        controlnet_scale: None,
        guidance_scale: 7.5,
        num_images: 1,
        steps: 30,
        seed: None,
        width: None,
        height: None,
        scheduler: SchedulerKind::EulerAncestral,
        preprocess: Preprocess::Scribble,
        guess_mode: None,
        control_guidance_start: 0.0,
        control_guidance_end: 1.0,
        timestep_spacing: None,
        eta: 0.0,
        vae: VaeKind::Full,
        start_image: None,
        strength: 0.8,
        canny_low_threshold: CannyThresholds::DEFAULT.low,
        canny_high_threshold: CannyThresholds::DEFAULT.high,
        clip_skip: 0,
    };
}

impl Default for GenerationRequest {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The message of a value outside its allowed range, the same wherever the value came from (validation here, or
/// a binding whose integer does not even fit the field's type: [`crate::settings::int_out_of_range`]).
pub(crate) fn out_of_range(
    field: &'static str,
    value: impl std::fmt::Display,
    start: impl std::fmt::Display,
    end: impl std::fmt::Display,
) -> Error {
    Error::invalid(
        field,
        format!("{value} is outside the allowed range {start}..={end}"),
    )
}

fn check_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    value: T,
    range: &std::ops::RangeInclusive<T>,
) -> Result<()> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(out_of_range(field, value, range.start(), range.end()))
    }
}

fn check_finite(field: &'static str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{value} is not a finite number"),
        ))
    }
}

fn check_text(field: &'static str, text: Option<&str>) -> Result<()> {
    match text {
        Some(t) if t.len() > MAX_PROMPT_BYTES => Err(Error::invalid(
            field,
            format!("{} bytes exceed the limit of {MAX_PROMPT_BYTES}", t.len()),
        )),
        Some(t) if t.contains('\0') => Err(Error::invalid(field, "contains a NUL character")),
        _ => Ok(()),
    }
}

impl GenerationRequest {
    /// Checks every field; the error names the first invalid one and what is allowed.
    pub fn validate(&self) -> Result<()> {
        check_text("prompt", self.prompt.as_deref())?;
        check_text("negative_prompt", self.negative_prompt.as_deref())?;
        check_finite("temperature", self.temperature)?;
        check_range("temperature", self.temperature, &TEMPERATURE_RANGE)?;
        if let Some(s) = self.controlnet_scale {
            check_finite("controlnet_scale", s)?;
            check_range("controlnet_scale", s, &CONTROLNET_SCALE_RANGE)?;
        }
        check_finite("guidance_scale", self.guidance_scale)?;
        check_range("guidance_scale", self.guidance_scale, &GUIDANCE_RANGE)?;
        check_range("num_images", self.num_images, &NUM_IMAGES_RANGE)?;
        check_range("steps", self.steps, &STEPS_RANGE)?;
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v {
                check_range(field, v, &SIZE_RANGE)?;
                if v % SIZE_MULTIPLE != 0 {
                    return Err(Error::invalid(
                        field,
                        format!("{v} is not a multiple of {SIZE_MULTIPLE}"),
                    ));
                }
            }
        }
        check_finite("control_guidance_start", self.control_guidance_start)?;
        check_finite("control_guidance_end", self.control_guidance_end)?;
        check_range(
            "control_guidance_start",
            self.control_guidance_start,
            &CONTROL_GUIDANCE_RANGE,
        )?;
        check_range(
            "control_guidance_end",
            self.control_guidance_end,
            &CONTROL_GUIDANCE_RANGE,
        )?;
        check_finite("eta", self.eta)?;
        check_range("eta", self.eta, &ETA_RANGE)?;
        check_range("clip_skip", self.clip_skip, &CLIP_SKIP_RANGE)?;
        if self.control_guidance_start >= self.control_guidance_end {
            return Err(Error::invalid(
                "control_guidance_start",
                format!(
                    "{} must be below control_guidance_end ({})",
                    self.control_guidance_start, self.control_guidance_end
                ),
            ));
        }
        check_finite("strength", self.strength)?;
        check_range("strength", self.strength, &STRENGTH_RANGE)?;
        if self.start_image.is_some() && self.denoising_begin() >= self.steps as usize {
            return Err(Error::invalid(
                "strength",
                format!(
                    "{} with {} steps keeps no denoising step (int(steps * strength) must be at least 1)",
                    self.strength, self.steps
                ),
            ));
        }
        check_range(
            "canny_low_threshold",
            self.canny_low_threshold,
            &CANNY_THRESHOLD_RANGE,
        )?;
        check_range(
            "canny_high_threshold",
            self.canny_high_threshold,
            &CANNY_THRESHOLD_RANGE,
        )?;
        if self.canny_low_threshold > self.canny_high_threshold {
            return Err(Error::invalid(
                "canny_low_threshold",
                format!(
                    "{} must not exceed canny_high_threshold ({})",
                    self.canny_low_threshold, self.canny_high_threshold
                ),
            ));
        }
        Ok(())
    }

    /// The first denoising step that runs: 0 without a start image, else where diffusers' `get_timesteps` begins
    /// for `strength` ([`strength_begin_index`]).
    pub fn denoising_begin(&self) -> usize {
        match self.start_image {
            None => 0,
            Some(_) => strength_begin_index(self.steps as usize, self.strength),
        }
    }

    /// The denoising steps that run: `steps`, or with a start image the last `int(steps * strength)` of them
    /// (a `trailing` schedule can add one, which the engine reports as it runs).
    pub fn denoising_steps(&self) -> usize {
        (self.steps as usize).saturating_sub(self.denoising_begin())
    }

    /// The thresholds of [`Preprocess::Canny`].
    pub fn canny_thresholds(&self) -> CannyThresholds {
        CannyThresholds {
            low: self.canny_low_threshold,
            high: self.canny_high_threshold,
        }
    }

    /// The ControlNet conditioning scale: `controlnet_scale` if set, else `1.65 - temperature`.
    pub fn conditioning_scale(&self) -> f64 {
        self.controlnet_scale.unwrap_or(1.65 - self.temperature)
    }

    /// The prompt, `""` when absent.
    pub fn prompt_text(&self) -> &str {
        self.prompt.as_deref().unwrap_or("")
    }

    /// The negative prompt actually used: the default when absent, none (`""`) when explicitly empty.
    pub fn negative_prompt_text(&self) -> &str {
        self.negative_prompt
            .as_deref()
            .unwrap_or(DEFAULT_NEGATIVE_PROMPT)
    }

    /// Whether guess mode is on: as forced, else exactly when the prompt is empty or blank.
    pub fn guess_mode(&self) -> bool {
        self.guess_mode
            .unwrap_or_else(|| self.prompt_text().trim().is_empty())
    }

    /// Whether classifier-free guidance runs (`guidance_scale > 1`, as in diffusers).
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

impl GenerationRequest {
    /// Sets the field `name` from its text, as the REST examples receive the fields of their multipart form:
    /// numbers are parsed after trimming whitespace, names as their [`FromStr`](std::str::FromStr) does, and an
    /// empty `seed` or `timestep_spacing` means absent. Errors are [`Error::InvalidRequest`] naming the field;
    /// `Ok(false)` when `name` is not a field of that form. Ranges are [`GenerationRequest::validate`]'s.
    pub fn set_form_field(&mut self, name: &str, text: &str) -> Result<bool> {
        fn number<T: std::str::FromStr>(field: &'static str, text: &str) -> Result<T> {
            text.trim()
                .parse()
                .map_err(|_| Error::invalid(field, format!("{text:?} is not a valid number")))
        }
        match name {
            "prompt" => self.prompt = Some(text.to_string()),
            "negative_prompt" => self.negative_prompt = Some(text.to_string()),
            "temperature" => self.temperature = number("temperature", text)?,
            "guidance_scale" => self.guidance_scale = number("guidance_scale", text)?,
            "num_images" => self.num_images = number("num_images", text)?,
            "steps" => self.steps = number("steps", text)?,
            "seed" if text.trim().is_empty() => self.seed = None,
            "seed" => self.seed = Some(number("seed", text)?),
            "width" => self.width = Some(number("width", text)?),
            "height" => self.height = Some(number("height", text)?),
            "scheduler" => self.scheduler = text.parse()?,
            "timestep_spacing" if text.trim().is_empty() => self.timestep_spacing = None,
            "timestep_spacing" => self.timestep_spacing = Some(text.parse()?),
            "eta" => self.eta = number("eta", text)?,
            "vae" => self.vae = text.parse()?,
            "preprocess" => self.preprocess = text.parse()?,
            "canny_low_threshold" => {
                self.canny_low_threshold = number("canny_low_threshold", text)?
            }
            "canny_high_threshold" => {
                self.canny_high_threshold = number("canny_high_threshold", text)?
            }
            "strength" => self.strength = number("strength", text)?,
            "clip_skip" => self.clip_skip = number("clip_skip", text)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_constant_and_valid() {
        assert_eq!(GenerationRequest::default(), GenerationRequest::DEFAULT);
        GenerationRequest::DEFAULT.validate().unwrap();
        let d = GenerationRequest::DEFAULT;
        assert!(TEMPERATURE_RANGE.contains(&d.temperature));
        assert!(GUIDANCE_RANGE.contains(&d.guidance_scale));
        assert!(NUM_IMAGES_RANGE.contains(&d.num_images));
        assert!(STEPS_RANGE.contains(&d.steps));
        assert!(CONTROL_GUIDANCE_RANGE.contains(&d.control_guidance_start));
        assert!(CONTROL_GUIDANCE_RANGE.contains(&d.control_guidance_end));
    }

    #[test]
    fn eta_is_checked_and_named() {
        for eta in [-0.01, 1.01, f64::NAN, f64::INFINITY] {
            let req = GenerationRequest {
                eta,
                ..GenerationRequest::DEFAULT
            };
            assert!(
                matches!(
                    req.validate(),
                    Err(Error::InvalidRequest { field: "eta", .. })
                ),
                "{eta}"
            );
        }
        for eta in [0.0, 0.3, 1.0] {
            let req = GenerationRequest {
                eta,
                timestep_spacing: Some(TimestepSpacing::Trailing),
                scheduler: SchedulerKind::Tcd,
                ..GenerationRequest::DEFAULT
            };
            req.validate().unwrap();
        }
    }

    #[test]
    fn vae_names_parse_in_any_case_and_back() {
        assert_eq!(VaeKind::names(), ["full", "tiny"]);
        assert_eq!(VaeKind::ALL[0], VaeKind::default());
        for kind in VaeKind::ALL {
            for spelled in [
                kind.as_str().to_string(),
                format!(" {} ", kind.as_str().to_ascii_uppercase()),
            ] {
                assert_eq!(spelled.parse::<VaeKind>().unwrap(), kind);
            }
            assert_eq!(kind.to_string(), kind.as_str());
        }
        for bad in ["", "taesd", "fullvae"] {
            match bad.parse::<VaeKind>() {
                Err(Error::InvalidRequest { field, message }) => {
                    assert_eq!(field, "vae");
                    assert!(message.contains("\"full\" or \"tiny\""), "{message}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    fn field_of(req: &GenerationRequest) -> &'static str {
        match req.validate() {
            Err(Error::InvalidRequest { field, .. }) => field,
            other => panic!("{req:?}: {other:?}"),
        }
    }

    #[test]
    fn strength_is_checked_and_must_keep_a_step() {
        let img2img = GenerationRequest {
            start_image: Some(StartImage::Sketch),
            steps: 10,
            ..GenerationRequest::DEFAULT
        };
        for strength in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            let req = GenerationRequest {
                strength,
                ..img2img.clone()
            };
            assert_eq!(field_of(&req), "strength", "{strength}");
        }
        // int(10 * 0.05) = 0 steps: nothing would run.
        let none_kept = GenerationRequest {
            strength: 0.05,
            ..img2img.clone()
        };
        assert_eq!(field_of(&none_kept), "strength");
        // Without a start image the strength is unused (but still range-checked).
        GenerationRequest {
            start_image: None,
            ..none_kept
        }
        .validate()
        .unwrap();
        for (strength, begin) in [(1.0, 0), (0.8, 2), (0.5, 5), (0.1, 9), (0.19, 9)] {
            let req = GenerationRequest {
                strength,
                ..img2img.clone()
            };
            req.validate().unwrap();
            assert_eq!(req.denoising_begin(), begin, "{strength}");
        }
        assert_eq!(GenerationRequest::DEFAULT.denoising_begin(), 0);
    }

    #[test]
    fn canny_thresholds_are_checked_in_range_and_order() {
        let with = |low, high| GenerationRequest {
            canny_low_threshold: low,
            canny_high_threshold: high,
            preprocess: Preprocess::Canny,
            ..GenerationRequest::DEFAULT
        };
        assert_eq!(field_of(&with(2041, 2041)), "canny_low_threshold");
        assert_eq!(field_of(&with(10, 5000)), "canny_high_threshold");
        assert_eq!(field_of(&with(201, 200)), "canny_low_threshold");
        for (low, high) in [(0, 0), (100, 200), (200, 200), (2040, 2040)] {
            with(low, high).validate().unwrap();
        }
        assert_eq!(
            GenerationRequest::DEFAULT.canny_thresholds(),
            CannyThresholds::DEFAULT
        );
    }

    #[test]
    fn start_images_decode_or_name_the_field() {
        for bad in [&b""[..], b"not an image", b"\x89PNG\r\n\x1a\n"] {
            match StartImage::decode(bad) {
                Err(Error::InvalidRequest { field, message }) => {
                    assert_eq!(field, "start_image");
                    assert!(!message.contains("sketch"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            StartImage::from_arg(" Sketch "),
            Ok(StartImage::Sketch)
        ));
        assert!(matches!(
            StartImage::from_arg("/no/such/image.png"),
            Err(Error::InvalidRequest {
                field: "start_image",
                ..
            })
        ));
        let image = Sketch::from_rgb8(2, 1, vec![0; 6]).unwrap();
        let start = StartImage::Image(Arc::new(image.clone()));
        assert_eq!(format!("{start:?}"), "Image(2x1)");
        let sketch = Sketch::from_rgb8(1, 1, vec![9; 3]).unwrap();
        assert_eq!(start.image(&sketch), &image);
        assert_eq!(StartImage::Sketch.image(&sketch), &sketch);
    }

    #[test]
    fn random_seeds_survive_json() {
        for _ in 0..64 {
            assert!(random_seed() < 1 << RANDOM_SEED_BITS);
        }
    }
}
