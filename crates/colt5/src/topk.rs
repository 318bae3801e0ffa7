//! A differentiable top-k: hard selection, soft gradients from the coordinate descent.

use burn::config::Config;
use burn::tensor::{Bool, Int, Tensor};

use crate::coor_descent::{
    coor_descent, top_k_indices, CoorDescentBackend, CoorDescentConfig, Solver,
};
use crate::error::Error;

/// Options of [`topk`]; defaults are the reference's.
#[derive(Config, Debug)]
pub struct TopkConfig {
    /// The coordinate descent targets `min(k · coor_descent_k_ratio, n)` (≥ 1). Default 9/8.
    #[config(default = 1.125)]
    pub coor_descent_k_ratio: f64,
    /// Coordinate-descent iterations. Default 20.
    #[config(default = 20)]
    pub n_iters: usize,
    /// Final temperature. Default 0.1.
    #[config(default = 0.1)]
    pub eps: f64,
    /// Initial temperature (`None`: `eps`). Default `None`.
    #[config(default = "None")]
    pub eps_init: Option<f64>,
    /// Temperature decay per iteration. Default 1.
    #[config(default = 1.0)]
    pub eps_decay: f64,
    /// Plain top-k with no soft scores (no gradient through the selection). Default false.
    #[config(default = false)]
    pub non_differentiable: bool,
}

/// What [`topk`] returns; all `[..., k]`.
#[derive(Debug, Clone)]
pub struct TopkOutput<B: CoorDescentBackend, const D: usize> {
    /// The selected values, descending.
    pub values: Tensor<B, D>,
    /// Their positions on the last axis.
    pub indices: Tensor<B, D, Int>,
    /// The soft top-k scores of the selected entries (`None` when non-differentiable).
    pub coor_descent_values: Option<Tensor<B, D>>,
    /// The straight-through gates of the selected entries: 1 in value, the soft scores'
    /// gradient (`None` when non-differentiable).
    pub gates: Option<Tensor<B, D>>,
}

/// Top-k of `x` over its last axis whose values carry the gradient of the soft top-k:
/// `values = topk(x · g)` with gates `g = c + stop_gradient(1 − c)`, `c` the coordinate
/// descent of `x` (forward value of `g`: exactly 1).
///
/// As the reference, the mask only enters the coordinate descent: masked entries (c = 0)
/// can still be selected by the hard top-k.
pub fn topk<B: CoorDescentBackend, const D: usize>(
    x: Tensor<B, D>,
    k: usize,
    mask: Option<Tensor<B, D, Bool>>,
    config: &TopkConfig,
) -> crate::Result<TopkOutput<B, D>> {
    let n = x.dims()[D - 1];
    if k == 0 || k > n {
        return Err(Error::KExceedsRow {
            k: k as f64,
            n,
            row: 0,
        });
    }
    if config.coor_descent_k_ratio < 1.0 {
        return Err(Error::config(
            "coor_descent_k_ratio",
            config.coor_descent_k_ratio,
            "at least 1",
        ));
    }
    if config.non_differentiable {
        let indices = top_k_indices(x.clone(), k)?;
        return Ok(TopkOutput {
            values: x.gather(D - 1, indices.clone()),
            indices,
            coor_descent_values: None,
            gates: None,
        });
    }
    let soft_config =
        CoorDescentConfig::new()
            .with_eps(config.eps)
            .with_solver(Solver::Iterations {
                n_iters: config.n_iters,
                eps_init: config.eps_init,
                eps_decay: config.eps_decay,
            });
    let target = (k as f64 * config.coor_descent_k_ratio).min(n as f64);
    let soft = coor_descent(x.clone(), target, mask, &soft_config)?;
    let gates = soft.clone() + soft.clone().neg().add_scalar(1.0).detach();
    let gated = x * gates.clone();
    let indices = top_k_indices(gated.clone(), k)?;
    Ok(TopkOutput {
        values: gated.gather(D - 1, indices.clone()),
        coor_descent_values: Some(soft.gather(D - 1, indices.clone())),
        gates: Some(gates.gather(D - 1, indices.clone())),
        indices,
    })
}
