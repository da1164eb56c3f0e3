//! Dense f64 linear algebra on the CPU for the one-off initialisations (PiSSA's SVD, OLoRA's QR,
//! EVA's SVD of activations, GaLore's SVD of a gradient), through `nalgebra`.

use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, DVector};

use crate::Result;

/// A 2-D tensor as an f64 matrix.
pub fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (m, n) = t.dims2()?;
    let data: Vec<f64> = t.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    Ok(DMatrix::from_row_slice(m, n, &data))
}

/// An f64 matrix as an f32 tensor on `device`.
pub fn to_tensor(m: &DMatrix<f64>, device: &Device) -> Result<Tensor> {
    let (r, c) = m.shape();
    let mut data = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            data.push(m[(i, j)] as f32);
        }
    }
    Ok(Tensor::from_vec(data, (r, c), &Device::Cpu)?.to_device(device)?)
}

/// Thin SVD `M = U diag(S) Vᵀ` with the singular values in decreasing order:
/// U [m, k], S [k], Vt [k, n], k = min(m, n).
pub fn svd(m: &DMatrix<f64>) -> (DMatrix<f64>, DVector<f64>, DMatrix<f64>) {
    let svd = m.clone().svd(true, true);
    let (u, s, vt) = (svd.u.expect("U requested"), svd.singular_values, svd.v_t.expect("Vt requested"));
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    let u = DMatrix::from_fn(u.nrows(), order.len(), |i, j| u[(i, order[j])]);
    let vt = DMatrix::from_fn(order.len(), vt.ncols(), |i, j| vt[(order[i], j)]);
    let s = DVector::from_fn(order.len(), |i, _| s[order[i]]);
    (u, s, vt)
}

/// Reduced QR `M = Q R`: Q [m, k] with orthonormal columns, R [k, n] upper triangular, k = min(m, n).
pub fn qr(m: &DMatrix<f64>) -> (DMatrix<f64>, DMatrix<f64>) {
    let qr = m.clone().qr();
    (qr.q(), qr.r())
}
