//! Batches of tokenized examples, padded on the left, and a resumable, seeded epoch iterator.
//!
//! Source: `docs/METHODS.md` §0.3: `tokenizer.pad_token_id = 0`,
//! `padding_side = "left"`, `DataCollatorForSeq2Seq(pad_to_multiple_of=8)` which pads the
//! labels with -100, and the HF Trainer's sampler which reshuffles every epoch and keeps the
//! last, smaller batch. The iterator's position `(epoch, index)` is what a checkpoint stores to
//! resume on the very next example.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::dataset::seeded_permutation;
use super::tokenize::{Tokenized, IGNORE_INDEX};
use crate::error::{Error, Result};

/// A padded batch, row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u32>,
    pub labels: Vec<i64>,
    pub batch: usize,
    pub seq_len: usize,
}

/// The batch as tensors: ids and mask `u32 [b, t]`, labels `i64 [b, t]`.
#[derive(Debug, Clone)]
pub struct BatchTensors {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
}

impl Batch {
    /// Left-pad `rows` with `pad_id` to the longest row rounded up to `multiple`
    /// (`pad_to_multiple_of`; 0 or 1 means no rounding).
    pub fn collate(rows: &[&Tokenized], pad_id: u32, multiple: usize) -> Result<Batch> {
        if rows.is_empty() {
            return Err(Error::msg("cannot build an empty batch"));
        }
        let longest = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
        let seq_len = round_up(longest, multiple.max(1));
        let mut batch = Batch {
            input_ids: Vec::with_capacity(rows.len() * seq_len),
            attention_mask: Vec::with_capacity(rows.len() * seq_len),
            labels: Vec::with_capacity(rows.len() * seq_len),
            batch: rows.len(),
            seq_len,
        };
        for row in rows {
            batch.push_row(row, pad_id)?;
        }
        Ok(batch)
    }

    fn push_row(&mut self, row: &Tokenized, pad_id: u32) -> Result<()> {
        if row.labels.len() != row.input_ids.len() {
            return Err(Error::msg(format!(
                "example has {} ids but {} labels",
                row.input_ids.len(),
                row.labels.len()
            )));
        }
        let pad = self.seq_len - row.input_ids.len();
        self.input_ids
            .extend(std::iter::repeat_n(pad_id, pad).chain(row.input_ids.iter().copied()));
        self.attention_mask
            .extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, row.input_ids.len())));
        self.labels
            .extend(std::iter::repeat_n(IGNORE_INDEX, pad).chain(row.labels.iter().copied()));
        Ok(())
    }

    /// Number of label positions that count in the loss.
    pub fn num_label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    pub fn to_tensors(&self, device: &Device) -> Result<BatchTensors> {
        let shape = (self.batch, self.seq_len);
        Ok(BatchTensors {
            input_ids: Tensor::from_slice(&self.input_ids, shape, device)?,
            attention_mask: Tensor::from_slice(&self.attention_mask, shape, device)?,
            labels: Tensor::from_slice(&self.labels, shape, device)?,
        })
    }
}

fn round_up(n: usize, multiple: usize) -> usize {
    n.div_ceil(multiple) * multiple
}

/// Where the iterator stands: the next batch starts at example `index` (an offset into the
/// epoch's shuffled order) of epoch `epoch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPosition {
    pub epoch: usize,
    pub index: usize,
}

/// Endless batches over `data`, epoch after epoch, each epoch in its own seeded order. The
/// training loop decides when to stop; `position()` is saved with a checkpoint and
/// `with_position` resumes from it.
pub struct BatchIter<'a> {
    data: &'a [Tokenized],
    batch_size: usize,
    pad_id: u32,
    pad_multiple: usize,
    seed: u64,
    pos: BatchPosition,
    order: Vec<usize>,
}

impl<'a> BatchIter<'a> {
    /// Padding with `pad_id` to a multiple of 8, as the recipe does.
    pub fn new(data: &'a [Tokenized], batch_size: usize, pad_id: u32, seed: u64) -> Result<Self> {
        if data.is_empty() || batch_size == 0 {
            return Err(Error::msg("batch iterator needs data and a batch size > 0"));
        }
        let order = epoch_order(data.len(), seed, 0);
        Ok(Self {
            data,
            batch_size,
            pad_id,
            pad_multiple: 8,
            seed,
            pos: BatchPosition::default(),
            order,
        })
    }

    pub fn with_pad_multiple(mut self, multiple: usize) -> Self {
        self.pad_multiple = multiple;
        self
    }

    /// Resume at a saved position (same data and seed give the same batches).
    pub fn with_position(mut self, pos: BatchPosition) -> Result<Self> {
        if pos.index > self.data.len() {
            return Err(Error::msg(format!(
                "saved position {} is past the {} examples of an epoch",
                pos.index,
                self.data.len()
            )));
        }
        self.order = epoch_order(self.data.len(), self.seed, pos.epoch);
        self.pos = pos;
        Ok(self)
    }

    pub fn position(&self) -> BatchPosition {
        self.pos
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.data.len().div_ceil(self.batch_size)
    }

    fn next_batch(&mut self) -> Result<Batch> {
        if self.pos.index >= self.data.len() {
            self.pos = BatchPosition {
                epoch: self.pos.epoch + 1,
                index: 0,
            };
            self.order = epoch_order(self.data.len(), self.seed, self.pos.epoch);
        }
        let end = (self.pos.index + self.batch_size).min(self.data.len());
        let rows: Vec<&Tokenized> = self.order[self.pos.index..end]
            .iter()
            .map(|&i| &self.data[i])
            .collect();
        let batch = Batch::collate(&rows, self.pad_id, self.pad_multiple)?;
        self.pos.index = end;
        Ok(batch)
    }
}

impl Iterator for BatchIter<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_batch())
    }
}

fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    seeded_permutation(n, seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tk(ids: &[u32], masked: usize) -> Tokenized {
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &x)| if i < masked { IGNORE_INDEX } else { x as i64 })
            .collect();
        Tokenized {
            input_ids: ids.to_vec(),
            labels,
        }
    }

    #[test]
    fn left_pads_to_a_multiple_of_8() {
        let a = tk(&[1, 5, 6, 7, 8, 9, 10, 11, 12, 2], 0);
        let b = tk(&[1, 5, 2], 1);
        let batch = Batch::collate(&[&a, &b], 0, 8).unwrap();
        assert_eq!((batch.batch, batch.seq_len), (2, 16));
        let row = |v: &[u32], r: usize| v[r * 16..(r + 1) * 16].to_vec();
        assert_eq!(
            row(&batch.input_ids, 1),
            [vec![0; 13], vec![1, 5, 2]].concat()
        );
        assert_eq!(
            row(&batch.attention_mask, 1),
            [vec![0; 13], vec![1; 3]].concat()
        );
        assert_eq!(batch.labels[16..], [vec![-100; 14], vec![5, 2]].concat());
        assert_eq!(row(&batch.input_ids, 0)[..6], [0; 6]);
        assert_eq!(row(&batch.attention_mask, 0)[6..], [1; 10]);
        assert_eq!(batch.num_label_tokens(), 12);
    }

    #[test]
    fn exact_multiple_is_not_padded_and_tensors_have_types() {
        let a = tk(&[1, 2, 3, 4, 5, 6, 7, 8], 0);
        let batch = Batch::collate(&[&a], 0, 8).unwrap();
        assert_eq!(batch.seq_len, 8);
        let t = batch.to_tensors(&Device::Cpu).unwrap();
        assert_eq!(t.input_ids.dims(), &[1, 8]);
        assert_eq!(t.input_ids.dtype(), candle_core::DType::U32);
        assert_eq!(t.attention_mask.dtype(), candle_core::DType::U32);
        assert_eq!(t.labels.dtype(), candle_core::DType::I64);
        assert_eq!(
            t.labels.to_vec2::<i64>().unwrap()[0],
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    fn data(n: u32) -> Vec<Tokenized> {
        (0..n).map(|i| tk(&[1, 100 + i], 0)).collect()
    }

    fn firsts(b: &Batch) -> Vec<u32> {
        (0..b.batch)
            .map(|r| b.input_ids[(r + 1) * b.seq_len - 1])
            .collect()
    }

    #[test]
    fn epoch_covers_everything_once_and_reshuffles() {
        let d = data(10);
        let mut it = BatchIter::new(&d, 4, 0, 42).unwrap();
        assert_eq!(it.batches_per_epoch(), 3);
        let epoch0: Vec<Batch> = (0..3).map(|_| it.next().unwrap().unwrap()).collect();
        assert_eq!(
            epoch0.iter().map(|b| b.batch).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        let mut seen: Vec<u32> = epoch0.iter().flat_map(firsts).collect();
        let order0 = seen.clone();
        seen.sort();
        assert_eq!(seen, (100..110).collect::<Vec<_>>());
        assert_eq!(
            it.position(),
            BatchPosition {
                epoch: 0,
                index: 10
            }
        );
        let b = it.next().unwrap().unwrap();
        assert_eq!(it.position(), BatchPosition { epoch: 1, index: 4 });
        let epoch1: Vec<u32> = firsts(&b);
        assert_ne!(epoch1, order0[..4]);
    }

    #[test]
    fn resumes_from_a_saved_position() {
        let d = data(13);
        let mut it = BatchIter::new(&d, 3, 0, 7).unwrap();
        for _ in 0..6 {
            it.next();
        }
        let pos = it.position();
        let json = serde_json::to_string(&pos).unwrap();
        let expected: Vec<Batch> = (0..4).map(|_| it.next().unwrap().unwrap()).collect();
        let saved: BatchPosition = serde_json::from_str(&json).unwrap();
        let mut resumed = BatchIter::new(&d, 3, 0, 7)
            .unwrap()
            .with_position(saved)
            .unwrap();
        let got: Vec<Batch> = (0..4).map(|_| resumed.next().unwrap().unwrap()).collect();
        assert_eq!(got, expected);
        assert!(BatchIter::new(&d, 3, 0, 7)
            .unwrap()
            .with_position(BatchPosition {
                epoch: 0,
                index: 14
            })
            .is_err());
    }
}
