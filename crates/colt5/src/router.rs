//! The coordinate-descent router: picks the tokens that go through the heavy branch.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Bool, Distribution, Int, Tensor};

use crate::coor_descent::{coor_descent, CoorDescentBackend, CoorDescentConfig, Solver};
use crate::error::Error;

/// Configuration of [`CoordinateDescentRouter`]; defaults are the reference's.
#[derive(Config, Debug)]
pub struct CoordinateDescentRouterConfig {
    /// Model width.
    pub dim: usize,
    /// Return straight-through scores: forward value 1, gradient of the soft top-k.
    /// Default true.
    #[config(default = true)]
    pub straight_through: bool,
    /// Coordinate-descent iterations. Default 20.
    #[config(default = 20)]
    pub n_iters: usize,
    /// The soft top-k targets `min(num_tokens · fetch_k_ratio, n)` (≥ 1). Default 9/8.
    #[config(default = 1.125)]
    pub fetch_k_ratio: f64,
    /// Final coordinate-descent temperature. Default 0.03.
    #[config(default = 0.03)]
    pub eps: f64,
    /// Initial temperature (`None`: start at `eps`). Default 4.
    #[config(default = "Some(4.0)")]
    pub eps_init: Option<f64>,
    /// Temperature decay per iteration. Default 0.7.
    #[config(default = 0.7)]
    pub eps_decay: f64,
    /// Number of routes (routing tokens), each selecting its own tokens. Default 1.
    #[config(default = 1)]
    pub num_routing_tokens: usize,
    /// Routing tokens are passed to `forward` instead of being parameters. Default false.
    #[config(default = false)]
    pub learned_routing_tokens: bool,
    /// Score by cosine similarity (both sides l2-normalised) times `cosine_sim_scale`.
    /// Default false.
    #[config(default = false)]
    pub cosine_sim_routing: bool,
    /// Scale of cosine-similarity scores. Default 8.
    #[config(default = 8.0)]
    pub cosine_sim_scale: f64,
    /// Route within consecutive blocks of this many tokens, the same count from each block
    /// (`None`: over the whole sequence). Default `None`.
    #[config(default = "None")]
    pub route_block_size: Option<usize>,
    /// Use the converged solver instead of the reference's iterations. Default false.
    #[config(default = false)]
    pub converged: bool,
}

/// What the router returns. Every tensor carries a route axis `r` (1 for a single route).
#[derive(Debug, Clone)]
pub struct RouterOutput<B: Backend> {
    /// Positions of the routed tokens, `[batch, r, num_tokens]` in descending order of score;
    /// `None` when the sequence is not longer than `num_tokens` (every token is routed).
    pub indices: Option<Tensor<B, 3, Int>>,
    /// Router scores of the routed tokens, `[batch, r, num_tokens]` (`[batch, r, n]` of ones
    /// when not routing); 0 for masked positions that were selected.
    pub scores: Tensor<B, 3>,
    /// The routed tokens, `[batch, r, num_tokens, dim]`.
    pub routed_tokens: Tensor<B, 4>,
    /// Their padding mask, `[batch, r, num_tokens]`, when a mask was given.
    pub routed_mask: Option<Tensor<B, 3, Bool>>,
}

/// Soft top-k routing of tokens by their similarity to learned routing tokens.
///
/// PyTorch parameter: `routing_token [num_routing_tokens, dim]` (absent with
/// `learned_routing_tokens`).
///
/// Differences from the reference, which is defective there: with several routes and
/// batch > 1 the routed tokens and mask are gathered from the right batch element;
/// `route_block_size` routes inside each block and gathers from the whole sequence (the
/// reference raises IndexError); `random_route` without a mask treats every token as valid.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::router::{CoordinateDescentRouterConfig, RouteOptions};
///
/// let device = Default::default();
/// let router = CoordinateDescentRouterConfig::new(16).init::<NdArray>(&device).unwrap();
/// let x = Tensor::<NdArray, 3>::random([2, 32, 16], Distribution::Normal(0.0, 1.0), &device);
/// let routed = router.forward(x, 4, RouteOptions::default()).unwrap();
/// assert_eq!(routed.routed_tokens.dims(), [2, 1, 4, 16]);
/// assert_eq!(routed.indices.unwrap().dims(), [2, 1, 4]);
/// ```
#[derive(Module, Debug)]
pub struct CoordinateDescentRouter<B: Backend> {
    /// The routing tokens, one per route.
    pub routing_token: Option<Param<Tensor<B, 2>>>,
    coor_descent: CoorDescentConfig,
    fetch_k_ratio: f64,
    straight_through: bool,
    num_routes: usize,
    cosine_sim_scale: Option<f64>,
    route_block_size: Option<usize>,
}

impl CoordinateDescentRouterConfig {
    /// A router with routing tokens drawn from N(0, 1), as the reference.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> crate::Result<CoordinateDescentRouter<B>> {
        if self.fetch_k_ratio < 1.0 || !self.fetch_k_ratio.is_finite() {
            return Err(Error::config(
                "fetch_k_ratio",
                self.fetch_k_ratio,
                "a finite number ≥ 1",
            ));
        }
        if self.num_routing_tokens == 0 {
            return Err(Error::config("num_routing_tokens", 0, "at least 1"));
        }
        if self.route_block_size == Some(0) {
            return Err(Error::config("route_block_size", 0, "at least 1"));
        }
        let solver = if self.converged {
            Solver::converged()
        } else {
            Solver::Iterations {
                n_iters: self.n_iters,
                eps_init: self.eps_init,
                eps_decay: self.eps_decay,
            }
        };
        let coor_descent = CoorDescentConfig::new()
            .with_eps(self.eps)
            .with_solver(solver);
        coor_descent.check()?;
        Ok(CoordinateDescentRouter {
            routing_token: (!self.learned_routing_tokens).then(|| {
                Param::from_tensor(Tensor::random(
                    [self.num_routing_tokens, self.dim],
                    Distribution::Normal(0.0, 1.0),
                    device,
                ))
            }),
            coor_descent,
            fetch_k_ratio: self.fetch_k_ratio,
            straight_through: self.straight_through,
            num_routes: self.num_routing_tokens,
            cosine_sim_scale: self.cosine_sim_routing.then_some(self.cosine_sim_scale),
            route_block_size: self.route_block_size,
        })
    }
}

/// Optional inputs of [`CoordinateDescentRouter::forward`].
#[derive(Debug, Clone, Default)]
pub struct RouteOptions<B: Backend> {
    /// Padding mask `[batch, n]`, `true` = real token.
    pub mask: Option<Tensor<B, 2, Bool>>,
    /// Route by random scores instead of the soft top-k (the reference's `random_route`).
    pub random_route: bool,
    /// Routing tokens `[batch, r, dim]`, required with `learned_routing_tokens`.
    pub routing_tokens: Option<Tensor<B, 3>>,
}

impl<B: CoorDescentBackend> CoordinateDescentRouter<B> {
    /// Routes `num_tokens` of the `n` tokens of `x: [batch, n, dim]` per route.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        num_tokens: usize,
        options: RouteOptions<B>,
    ) -> crate::Result<RouterOutput<B>> {
        let [batch, n, dim] = x.dims();
        let routes = self.num_routes;
        if let Some(token) = &self.routing_token {
            let expected = token.dims()[1];
            if dim != expected {
                return Err(Error::Shape {
                    name: "x",
                    actual: vec![batch, n, dim],
                    expected: format!("[batch, n, {expected}] (the router's dim)"),
                });
            }
        }
        if let Some(mask) = &options.mask {
            if mask.dims() != [batch, n] {
                return Err(Error::Shape {
                    name: "mask",
                    actual: mask.dims().to_vec(),
                    expected: format!("[{batch}, {n}] (batch and length of x)"),
                });
            }
        }
        if num_tokens == 0 {
            return Err(Error::config("num_tokens", 0, "at least 1"));
        }
        let tokens = self.routing_tokens(batch, dim, options.routing_tokens)?;
        if n <= num_tokens {
            return Ok(RouterOutput {
                indices: None,
                scores: Tensor::ones([batch, routes, n], &x.device()),
                routed_tokens: x.unsqueeze_dim::<4>(1).expand([batch, routes, n, dim]),
                routed_mask: options
                    .mask
                    .map(|m| m.unsqueeze_dim::<3>(1).expand([batch, routes, n])),
            });
        }
        let (block, blocks, per_block) = match self.route_block_size {
            Some(block) => {
                let blocks = n / block;
                if blocks == 0 {
                    return Err(Error::Shape {
                        name: "x",
                        actual: vec![batch, n, dim],
                        expected: format!("at least route_block_size = {block} tokens"),
                    });
                }
                (block, blocks, num_tokens.div_ceil(blocks).min(block))
            }
            None => (n, 1, num_tokens),
        };

        // Scores [batch, r, blocks·block] → rows [batch·r·blocks, block].
        let features = |t: Tensor<B, 3>| match self.cosine_sim_scale {
            Some(_) => l2_normalize(t),
            None => t,
        };
        let routed_len = blocks * block;
        let x_routed = x.clone().narrow(1, 0, routed_len);
        let mut scores = features(x_routed)
            .matmul(features(tokens).swap_dims(1, 2))
            .swap_dims(1, 2);
        if let Some(scale) = self.cosine_sim_scale {
            scores = scores.mul_scalar(scale);
        }
        let rows = batch * routes * blocks;
        let scores = scores.reshape([rows, block]);
        let row_mask = options.mask.clone().map(|m| {
            m.narrow(1, 0, routed_len)
                .unsqueeze_dim::<3>(1)
                .expand([batch, routes, routed_len])
                .reshape([rows, block])
        });

        let soft = if options.random_route {
            let noise = Tensor::random([rows, block], Distribution::Normal(0.0, 1.0), &x.device());
            match &row_mask {
                Some(mask) => noise.mask_fill(mask.clone().bool_not(), f32::MIN),
                None => noise,
            }
        } else {
            let k = (per_block as f64 * self.fetch_k_ratio).min(block as f64);
            coor_descent(scores, k, row_mask.clone(), &self.coor_descent)?
        };
        let (mut selected, local) = soft.topk_with_indices(per_block, 1);
        if self.straight_through {
            selected = selected.clone() + selected.neg().add_scalar(1.0).detach();
        }
        let selected_mask = row_mask.map(|mask| mask.int().gather(1, local.clone()).equal_elem(1));
        if let Some(mask) = &selected_mask {
            selected = selected.mask_fill(mask.clone().bool_not(), 0.0);
        }

        // Block-local positions → sequence positions, [batch, r, blocks·per_block].
        let count = blocks * per_block;
        let offsets = Tensor::<B, 1, Int>::arange(0..blocks as i64, &x.device())
            .mul_scalar(block as i64)
            .reshape([1, blocks, 1]);
        let indices = (local.reshape([batch * routes, blocks, per_block]) + offsets)
            .reshape([batch, routes, count]);
        let scores = selected.reshape([batch, routes, count]);
        let routed_mask = selected_mask.map(|m| m.reshape([batch, routes, count]));
        let gather_index = indices.clone().reshape([batch, routes * count, 1]).expand([
            batch,
            routes * count,
            dim,
        ]);
        let routed_tokens = x
            .gather(1, gather_index)
            .reshape([batch, routes, count, dim]);
        Ok(RouterOutput {
            indices: Some(indices),
            scores,
            routed_tokens,
            routed_mask,
        })
    }

    /// The routing tokens as `[batch, r, dim]`.
    fn routing_tokens(
        &self,
        batch: usize,
        dim: usize,
        given: Option<Tensor<B, 3>>,
    ) -> crate::Result<Tensor<B, 3>> {
        let routes = self.num_routes;
        match (&self.routing_token, given) {
            (Some(param), None) => Ok(param
                .val()
                .unsqueeze_dim::<3>(0)
                .expand([batch, routes, dim])),
            (None, Some(tokens)) if tokens.dims() == [batch, routes, dim] => Ok(tokens),
            (None, Some(tokens)) => Err(Error::Shape {
                name: "routing_tokens",
                actual: tokens.dims().to_vec(),
                expected: format!("[{batch}, {routes}, {dim}] (batch, num_routing_tokens, dim)"),
            }),
            (None, None) => Err(Error::config(
                "routing_tokens",
                "None",
                "routing tokens [batch, r, dim]: the router was built with learned_routing_tokens",
            )),
            (Some(_), Some(_)) => Err(Error::config(
                "routing_tokens",
                "a tensor",
                "None: this router has its own routing tokens",
            )),
        }
    }
}

/// `x / max(‖x‖₂, 1e-12)` over the last axis.
fn l2_normalize<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let norm = x.clone().square().sum_dim(2).sqrt().clamp_min(1e-12);
    x / norm
}
