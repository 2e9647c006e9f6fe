//! What a network computes from an input that stays the same through a job's steps, kept for the next step.
//!
//! The text embeddings and the control image do not change between denoising steps, so neither do the
//! cross-attention keys and values computed from the text, nor the ControlNet's embedding of the control image:
//! diffusers recomputes them at every step. [`PerTensor`] keeps the last result together with the identity of the
//! tensor it came from. candle tensors are immutable and their ids are never reused, so the same id means the
//! same values; any other tensor (the next job's, or a concurrent job's) is computed afresh and replaces it.

use std::sync::Mutex;

use candle_core::{Tensor, TensorId};

/// The result of a function of one tensor, kept for the next call on the same tensor (see the module docs).
#[derive(Debug)]
pub(crate) struct PerTensor<T>(Mutex<Option<(TensorId, T)>>);

impl<T> Default for PerTensor<T> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<T: Clone> PerTensor<T> {
    /// `f(key)`, computed only when the last call was on another tensor. Errors are returned and not kept.
    ///
    /// `f` runs without the lock held: a forward pass runs on a rayon pool thread ([`crate::ops::on_pool`]),
    /// which while it waits for its own parallel work may take up another job's forward pass and come back here
    /// (with the lock held across `f`, it would wait for itself). Two calls on a new tensor at once both compute.
    pub(crate) fn get<E>(
        &self,
        key: &Tensor,
        f: impl FnOnce(&Tensor) -> Result<T, E>,
    ) -> Result<T, E> {
        if let Some((id, v)) = self.slot().as_ref() {
            if *id == key.id() {
                return Ok(v.clone());
            }
        }
        let v = f(key)?;
        *self.slot() = Some((key.id(), v.clone()));
        Ok(v)
    }

    /// The slot, locked. A poisoned lock only means a panic elsewhere while it was held; the slot is then
    /// recomputed.
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(TensorId, T)>> {
        self.0.lock().unwrap_or_else(|e| {
            let mut g = e.into_inner();
            *g = None;
            g
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn computes_once_per_tensor() {
        let memo = PerTensor::default();
        let a = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        let calls = std::cell::Cell::new(0);
        let twice = |t: &Tensor| {
            calls.set(calls.get() + 1);
            (t * 2.0).map(|t| t.to_vec1::<f32>().unwrap())
        };
        assert_eq!(memo.get(&a, twice).unwrap(), [2., 4.]);
        assert_eq!(memo.get(&a.clone(), twice).unwrap(), [2., 4.]);
        assert_eq!(
            calls.get(),
            1,
            "the same tensor (or a clone of it) is not recomputed"
        );
        assert_eq!(memo.get(&b, twice).unwrap(), [2., 4.]);
        assert_eq!(calls.get(), 2, "equal values in another tensor are");
        assert!(
            memo.get(&a, |_| Err::<Vec<f32>, _>("failed")).is_err(),
            "an error is returned"
        );
        assert_eq!(memo.get(&a, twice).unwrap(), [2., 4.]);
        assert_eq!(calls.get(), 3, "and nothing was kept in its place");
        // A computation that comes back to the memo (a pool thread taking up another job meanwhile) does not
        // wait for itself; the last to finish is kept.
        let c = Tensor::new(&[3f32], &Device::Cpu).unwrap();
        let nested = memo.get(&b, |_| memo.get(&c, twice)).unwrap();
        assert_eq!(nested, [6.]);
        assert_eq!(calls.get(), 4);
        assert_eq!(memo.get(&b, twice).unwrap(), [6.], "b's result was kept");
        assert_eq!(calls.get(), 4);
    }
}
