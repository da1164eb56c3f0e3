//! Shared by the integration tests: the tiny random model and the left-padded batch they train
//! and compare on.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::training::TrainBatch;

/// A 2-layer random LLaMA (hidden 64, GQA 4/2, vocab 50).
pub fn tiny(dtype: DType) -> Llama {
    Llama::random(LlamaConfig::tiny(50), 7, dtype, &Device::Cpu).unwrap()
}

/// Two rows of 8 tokens; the first is left-padded by 2.
pub fn batch() -> TrainBatch {
    let d = &Device::Cpu;
    let ids = Tensor::new(&[[0u32, 0, 5, 9, 13, 2, 7, 11], [3, 4, 5, 6, 7, 8, 9, 10]], d).unwrap();
    let mask = vec![vec![0, 0, 1, 1, 1, 1, 1, 1], vec![1; 8]];
    let labels = Tensor::new(&[[-100i64, -100, 5, 9, 13, 2, 7, 11], [3, 4, 5, 6, 7, 8, 9, 10]], d).unwrap();
    TrainBatch { input_ids: ids, mask, labels }
}

/// The model's logits on `batch()`.
pub fn logits(model: &Llama) -> Tensor {
    let b = batch();
    model.forward(&b.input_ids, Some(&b.mask), None, false).unwrap()
}
