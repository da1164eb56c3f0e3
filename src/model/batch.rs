//! A batch as the model takes it for training: tensors on the model's device.

use candle_core::Tensor;

/// A micro-batch on the model's device: token ids [b, t] (u32), the padding mask, labels [b, t]
/// (i64, -100 where no loss is taken).
pub struct TrainBatch {
    pub input_ids: Tensor,
    pub mask: Vec<Vec<u32>>,
    pub labels: Tensor,
}

impl TrainBatch {
    pub fn tokens(&self) -> usize {
        self.mask.iter().map(|r| r.iter().filter(|&&m| m == 1).count()).sum()
    }
}
