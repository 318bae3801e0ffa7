//! The coordinate-descent router: picks the tokens that go through the heavy branch.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Bool, Distribution, Int, Tensor};

use crate::coor_descent::{
    coor_descent, top_k_indices, CoorDescentBackend, CoorDescentConfig, Solver,
};
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
        // The scores are the router's own products of finite activations: checking them
        // would read them back from the device on every call.
        let coor_descent = CoorDescentConfig::new()
            .with_eps(self.eps)
            .with_solver(solver)
            .with_validate(false);
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
        if let Some(mask) = &options.mask {
            if mask.dims() != [batch, n] {
                return Err(Error::Shape {
                    name: "mask",
                    actual: mask.dims().to_vec(),
                    expected: format!("[{batch}, {n}] (batch and length of x)"),
                });
            }
        }
        let tokens = self.routing_tokens([batch, n, dim], options.routing_tokens)?;
        let masks = options.mask.map(|mask| mask.unsqueeze_dim::<3>(1));
        self.route(x, tokens, num_tokens, masks, 1, options.random_route)
    }

    /// Routes `x: [batch, n, dim]` once for each of `groups` masks per sequence,
    /// `masks: [batch, groups, n]` (`true` = may be routed): group g of sequence b selects
    /// `num_tokens` tokens per route among those its mask shows. The output is that of
    /// [`forward`](Self::forward) on `batch · groups` sequences (row `b · groups + g`), but
    /// each token's score is computed once and only the selected tokens are gathered, so the
    /// cost in memory is one scalar per group, route and token instead of a copy of `x` per
    /// group. The causal routed attention routes each window's keys among all earlier
    /// tokens this way.
    pub fn forward_groups(
        &self,
        x: Tensor<B, 3>,
        num_tokens: usize,
        masks: Tensor<B, 3, Bool>,
        random_route: bool,
    ) -> crate::Result<RouterOutput<B>> {
        let [batch, n, dim] = x.dims();
        let [mask_batch, groups, mask_n] = masks.dims();
        if mask_batch != batch || mask_n != n || groups == 0 {
            return Err(Error::Shape {
                name: "masks",
                actual: vec![mask_batch, groups, mask_n],
                expected: format!("[{batch}, groups ≥ 1, {n}] (batch and length of x)"),
            });
        }
        let tokens = self.routing_tokens([batch, n, dim], None)?;
        self.route(x, tokens, num_tokens, Some(masks), groups, random_route)
    }

    /// The routing of [`forward_groups`](Self::forward_groups) given the routing tokens
    /// `[batch, r, dim]`; `masks: [batch, groups, n]`.
    fn route(
        &self,
        x: Tensor<B, 3>,
        tokens: Tensor<B, 3>,
        num_tokens: usize,
        masks: Option<Tensor<B, 3, Bool>>,
        groups: usize,
        random_route: bool,
    ) -> crate::Result<RouterOutput<B>> {
        let [batch, n, dim] = x.dims();
        let routes = self.num_routes;
        if num_tokens == 0 {
            return Err(Error::config("num_tokens", 0, "at least 1"));
        }
        let sequences = batch * groups;
        // [batch, n] per sequence → [batch · groups, r, n] per sequence and route.
        let per_route = |mask: Tensor<B, 3, Bool>, len: usize| {
            mask.unsqueeze_dim::<4>(2)
                .expand([batch, groups, routes, len])
                .reshape([sequences, routes, len])
        };
        if n <= num_tokens {
            return Ok(RouterOutput {
                indices: None,
                scores: Tensor::ones([sequences, routes, n], &x.device()),
                routed_tokens: x
                    .reshape([batch, 1, 1, n, dim])
                    .expand([batch, groups, routes, n, dim])
                    .reshape([sequences, routes, n, dim]),
                routed_mask: masks.map(|m| per_route(m, n)),
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

        // One score per token and route, [batch, r, blocks·block], shared by the groups:
        // rows [batch·groups·r·blocks, block].
        let features = |t: Tensor<B, 3>| match self.cosine_sim_scale {
            Some(_) => l2_normalize(t),
            None => t,
        };
        let routed_len = blocks * block;
        let x_routed = x.clone().narrow(1, 0, routed_len);
        // The routing tokens' gradient sums over the tokens: computed per chunk of tokens
        // (see `crate::linear`).
        let (chunks, chunk) = match crate::linear::chunk_len(routed_len) {
            Some(chunk) => (routed_len / chunk, chunk),
            None => (1, routed_len),
        };
        let mut scores = features(x_routed)
            .reshape([batch * chunks, chunk, dim])
            .matmul(
                features(tokens)
                    .unsqueeze_dim::<4>(1)
                    .expand([batch, chunks, routes, dim])
                    .reshape([batch * chunks, routes, dim])
                    .swap_dims(1, 2),
            )
            .reshape([batch, routed_len, routes])
            .swap_dims(1, 2);
        if let Some(scale) = self.cosine_sim_scale {
            scores = scores.mul_scalar(scale);
        }
        let rows = sequences * routes * blocks;
        let scores = scores
            .unsqueeze_dim::<4>(1)
            .expand([batch, groups, routes, routed_len])
            .reshape([rows, block]);
        let row_mask =
            masks.map(|m| per_route(m.narrow(2, 0, routed_len), routed_len).reshape([rows, block]));

        let soft = if random_route {
            let noise = Tensor::random([rows, block], Distribution::Normal(0.0, 1.0), &x.device());
            match &row_mask {
                Some(mask) => noise.mask_fill(mask.clone().bool_not(), f32::MIN),
                None => noise,
            }
        } else {
            let k = (per_block as f64 * self.fetch_k_ratio).min(block as f64);
            coor_descent(scores, k, row_mask.clone(), &self.coor_descent)?
        };
        let local = top_k_indices(soft.clone(), per_block)?;
        let mut selected = crate::rows::gather_rows(soft, local.clone());
        if self.straight_through {
            selected = selected.clone() + selected.neg().add_scalar(1.0).detach();
        }
        let selected_mask = row_mask.map(|mask| mask.int().gather(1, local.clone()).equal_elem(1));
        if let Some(mask) = &selected_mask {
            selected = selected.mask_fill(mask.clone().bool_not(), 0.0);
        }

        // Block-local positions → sequence positions, [batch·groups, r, blocks·per_block].
        let count = blocks * per_block;
        let offsets = Tensor::<B, 1, Int>::arange(0..blocks as i64, &x.device())
            .mul_scalar(block as i64)
            .reshape([1, blocks, 1]);
        let indices = (local.reshape([sequences * routes, blocks, per_block]) + offsets)
            .reshape([sequences, routes, count]);
        let scores = selected.reshape([sequences, routes, count]);
        let routed_mask = selected_mask.map(|m| m.reshape([sequences, routes, count]));
        let gathered = groups * routes * count;
        let routed_tokens = crate::rows::gather_rows(x, indices.clone().reshape([batch, gathered]))
            .reshape([sequences, routes, count, dim]);
        Ok(RouterOutput {
            indices: Some(indices),
            scores,
            routed_tokens,
            routed_mask,
        })
    }

    /// The routing tokens as `[batch, r, dim]` for `x` of shape `x_dims`.
    fn routing_tokens(
        &self,
        x_dims: [usize; 3],
        given: Option<Tensor<B, 3>>,
    ) -> crate::Result<Tensor<B, 3>> {
        let [batch, n, dim] = x_dims;
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
