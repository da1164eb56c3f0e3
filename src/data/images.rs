//! Image classification data: IDX files (the MNIST family's format: Fashion-MNIST, MNIST), a
//! VTAB-1k-style sample (Zhai et al., "A Large-scale Study of Representation Learning with the
//! Visual Task Adaptation Benchmark", 2019: 800 training and 200 validation images drawn from the
//! training split, the whole test split for accuracy), and the backbone's input: grey levels
//! scaled to [0, 1], resized bicubically to the backbone's size (clamped back to [0, 1], as an
//! 8-bit image would be), copied to 3 channels and normalised by ImageNet's mean and deviation.
//!
//! IDX: a big-endian header `0x00 0x00 type dims` (type 0x08: unsigned bytes), one u32 size per
//! dim, then the values row-major; gzip-compressed files (`.gz`) are read as such.

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};

/// ImageNet's per-channel mean and standard deviation (RGB), which DINOv2 was trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Grey images with their labels.
#[derive(Debug, Clone)]
pub struct ImageSet {
    /// [n, rows, cols] grey levels 0..=255
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> ImageSet {
        let size = self.rows * self.cols;
        ImageSet {
            pixels: indices.iter().flat_map(|&i| self.pixels[i * size..(i + 1) * size].iter().copied()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// An IDX image file and its IDX label file; the counts must agree.
    pub fn read_idx(images: &Path, labels: &Path) -> Result<ImageSet> {
        let (pixels, dims) = read_idx(images)?;
        let (labels_v, label_dims) = read_idx(labels)?;
        if dims.len() != 3 || label_dims.len() != 1 {
            return Err(Error::msg(format!("{} has dims {dims:?} and {} has {label_dims:?}: expected [n, rows, cols] images and [n] labels", images.display(), labels.display())));
        }
        if dims[0] != label_dims[0] {
            return Err(Error::msg(format!("{} holds {} images but {} holds {} labels", images.display(), dims[0], labels.display(), label_dims[0])));
        }
        Ok(ImageSet { pixels, labels: labels_v, rows: dims[1], cols: dims[2] })
    }

    /// The images as a backbone's input [n, 3, size, size] (module doc).
    pub fn backbone_input(&self, size: usize, device: &Device) -> Result<Tensor> {
        let n = self.len();
        let grey: Vec<f32> = self.pixels.iter().map(|&p| p as f32 / 255.0).collect();
        let resized = crate::model::vit::resize_bicubic(&grey, n, (self.rows, self.cols), (size, size));
        let plane = size * size;
        let mut out = Vec::with_capacity(n * 3 * plane);
        for image in resized.chunks_exact(plane) {
            for c in 0..3 {
                out.extend(image.iter().map(|&v| (v.clamp(0.0, 1.0) - IMAGENET_MEAN[c]) / IMAGENET_STD[c]));
            }
        }
        Ok(Tensor::from_vec(out, (n, 3, size, size), device)?)
    }
}

/// An IDX file of unsigned bytes: its values and dims.
pub fn read_idx(path: &Path) -> Result<(Vec<u8>, Vec<usize>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    let read = if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_end(&mut bytes)
    } else {
        std::io::BufReader::new(file).read_to_end(&mut bytes)
    };
    read.map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    parse_idx(&bytes).map_err(|what| Error::msg(format!("{}: not an IDX file of bytes: {what}", path.display())))
}

fn parse_idx(bytes: &[u8]) -> std::result::Result<(Vec<u8>, Vec<usize>), String> {
    let header = bytes.get(..4).ok_or("shorter than its 4-byte header")?;
    if header[0] != 0 || header[1] != 0 {
        return Err(format!("magic {:02x} {:02x}, expected 00 00", header[0], header[1]));
    }
    if header[2] != 0x08 {
        return Err(format!("element type 0x{:02x}, only 0x08 (unsigned byte) is read", header[2]));
    }
    let rank = header[3] as usize;
    let sizes = bytes.get(4..4 + 4 * rank).ok_or("the dims run past the end")?;
    let dims: Vec<usize> = sizes.chunks_exact(4).map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")) as usize).collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("the dims overflow")?;
    let values = &bytes[4 + 4 * rank..];
    if values.len() != count {
        return Err(format!("dims {dims:?} need {count} values, the file has {}", values.len()));
    }
    Ok((values.to_vec(), dims))
}

/// VTAB-1k's sample of a training split: `train` then `val` distinct indices, drawn with `seed`.
pub fn vtab_sample(n: usize, train: usize, val: usize, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if train + val > n {
        return Err(Error::msg(format!("{train} training and {val} validation images from a split of {n}")));
    }
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    Ok((all[..train].to_vec(), all[train..train + val].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], values: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(values);
        b
    }

    #[test]
    fn reads_idx_files_plain_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8 * 10).collect();
        std::fs::write(dir.path().join("images"), idx(&[2, 3, 4], &pixels)).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &idx(&[2], &[7, 3])).unwrap();
        std::fs::write(dir.path().join("labels.gz"), gz.finish().unwrap()).unwrap();
        let set = ImageSet::read_idx(&dir.path().join("images"), &dir.path().join("labels.gz")).unwrap();
        assert_eq!((set.rows, set.cols, set.labels.clone(), set.pixels.clone()), (3, 4, vec![7, 3], pixels));
        let one = set.select(&[1]);
        assert_eq!((one.labels, one.pixels), (vec![3], (12..24).map(|i| i as u8 * 10).collect::<Vec<_>>()));
    }

    #[test]
    fn bad_idx_files_are_clear_errors() {
        for (bytes, says) in [
            (vec![1, 0, 8, 1, 0, 0, 0, 1, 5], "magic 01 00"),
            (vec![0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0], "element type 0x0d"),
            (idx(&[2, 2], &[1, 2, 3]), "need 4 values, the file has 3"),
            (vec![0, 0, 8, 3, 0, 0], "past the end"),
            (vec![0, 0], "header"),
        ] {
            assert!(parse_idx(&bytes).unwrap_err().contains(says), "{says}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("i"), idx(&[2, 1, 1], &[1, 2])).unwrap();
        std::fs::write(dir.path().join("l"), idx(&[3], &[1, 2, 3])).unwrap();
        let err = ImageSet::read_idx(&dir.path().join("i"), &dir.path().join("l")).unwrap_err().to_string();
        assert!(err.contains("holds 2 images") && err.contains("holds 3 labels"), "{err}");
        assert!(read_idx(&dir.path().join("missing")).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn backbone_input_is_normalised_grey_in_three_channels() {
        let set = ImageSet { pixels: vec![255; 4], labels: vec![0], rows: 2, cols: 2 };
        let x: Vec<f32> = set.backbone_input(4, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x.len(), 3 * 16);
        for c in 0..3 {
            let want = (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            assert!(x[c * 16..(c + 1) * 16].iter().all(|v| (v - want).abs() < 1e-5));
        }
    }

    #[test]
    fn the_vtab_sample_is_disjoint_and_seeded() {
        let (train, val) = vtab_sample(1500, 800, 200, 3).unwrap();
        let mut all: Vec<usize> = train.iter().chain(&val).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!((train.len(), val.len(), all.len()), (800, 200, 1000));
        assert_eq!(vtab_sample(1500, 800, 200, 3).unwrap().0, train);
        assert_ne!(vtab_sample(1500, 800, 200, 4).unwrap().0, train);
        assert!(vtab_sample(900, 800, 200, 0).is_err());
    }
}
