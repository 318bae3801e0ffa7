//! Runs reference cases ([`golden`](crate::golden)) against our implementation and
//! measures the differences.
//!
//! Errors are relative, `max |ours − reference| / max |reference|`, and the tolerances are
//! those of the golden README: 1e-8 in f64; in f32, with e = min(eps, 1) of the coordinate
//! descent involved, 1e-5/e for outputs and 1e-4/e for gradients of the operator itself,
//! ten times that for modules built on it.

use std::collections::BTreeMap;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::tensor::{backend::AutodiffBackend, Bool, Int, Tensor, TensorData};

use crate::attend::AttendConfig;
use crate::attention::SelfAttentionConfig;
use crate::coor_descent::{coor_descent, CoorDescentBackend, CoorDescentConfig, RowK};
use crate::feed_forward::FeedForwardConfig;
use crate::golden::{Case, CaseTensor};
use crate::import::{torch_params, ParamReader, StateDict};
use crate::lm::{CdTransformerConfig, LanguageModel};
use crate::local_attention::LocalMhaConfig;
use crate::norm::RmsNormConfig;
use crate::routed::{
    ConditionalRoutedAttentionConfig, ConditionalRoutedAutoregressiveAttentionConfig,
    ConditionalRoutedFeedForwardConfig, ConditionalRoutedImageAttentionConfig,
    ConditionalRoutedTransformerBlockConfig,
};
use crate::router::{CoordinateDescentRouterConfig, RouteOptions};
use crate::topk::{topk, TopkConfig};
use crate::vit::ConditionalRoutedViTConfig;

/// The floating-point precision a case is run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// `NdArray<f64>`.
    F64,
    /// `NdArray<f32>`.
    F32,
}

/// The difference between one of our tensors and the reference's.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// The case key compared (`out.scores`, `grad.in.s`, ...).
    pub name: String,
    /// max |ours − reference|.
    pub max_abs: f64,
    /// max_abs / max |reference|.
    pub relative: f64,
    /// The largest relative error that passes.
    pub tolerance: f64,
}

impl Comparison {
    /// Whether the error is within tolerance (a NaN never is).
    pub fn ok(&self) -> bool {
        self.relative <= self.tolerance
    }
}

/// The result of running one case.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Every output and gradient of the case, compared.
    Compared(Vec<Comparison>),
    /// The case's module is not implemented by this version of colt5.
    Unsupported,
}

impl Outcome {
    /// Whether every comparison passed (false when unsupported).
    pub fn passed(&self) -> bool {
        match self {
            Outcome::Compared(comparisons) => comparisons.iter().all(Comparison::ok),
            Outcome::Unsupported => false,
        }
    }
}

/// Runs `case` on the CPU backend in `precision`.
pub fn run_case(case: &Case, precision: Precision) -> crate::Result<Outcome> {
    match precision {
        Precision::F64 => run::<Autodiff<NdArray<f64>>>(case, precision),
        Precision::F32 => run::<Autodiff<NdArray<f32>>>(case, precision),
    }
}

fn run<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Outcome> {
    match case.module.as_str() {
        "coor_descent" => coor_descent_case::<B>(case, precision).map(Outcome::Compared),
        "RMSNorm" | "FeedForward" | "SelfAttention" => {
            layer_case::<B>(case, precision).map(Outcome::Compared)
        }
        "Attend" => attend_case::<B>(case, precision).map(Outcome::Compared),
        "CoordinateDescentRouter" => router_case::<B>(case, precision).map(Outcome::Compared),
        "topk" => topk_case::<B>(case, precision).map(Outcome::Compared),
        "LocalMHA" => local_mha_case::<B>(case, precision).map(Outcome::Compared),
        "ConditionalRoutedFeedForward"
        | "ConditionalRoutedAttention"
        | "ConditionalRoutedAutoregressiveAttention"
        | "ConditionalRoutedTransformerBlock" => {
            routed_case::<B>(case, precision).map(Outcome::Compared)
        }
        "ConditionalRoutedImageAttention" => {
            image_case::<B>(case, precision).map(Outcome::Compared)
        }
        "ConditionalRoutedViT" => vit_case::<B>(case, precision).map(Outcome::Compared),
        "CoordinateDescentAttentionTransformer" => {
            cd_lm_case::<B>(case, precision).map(Outcome::Compared)
        }
        _ => Ok(Outcome::Unsupported),
    }
}

/// Relative tolerances (output, gradient) for a component whose coordinate descent runs at
/// temperature `eps` (`None`: no coordinate descent involved); `module` widens them tenfold.
fn tolerances(precision: Precision, eps: Option<f64>, module: bool) -> (f64, f64) {
    match precision {
        Precision::F64 => (1e-8, 1e-8),
        Precision::F32 => {
            let conditioning = eps.map_or(1.0, |eps| eps.min(1.0));
            let widen = if module { 10.0 } else { 1.0 };
            (1e-5 / conditioning * widen, 1e-4 / conditioning * widen)
        }
    }
}

fn coor_descent_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let eps = case.config_f64("eps")?.unwrap_or(0.1);
    let n_iters = case.config_f64("n_iters")?.unwrap_or(0.0) as usize;
    let config = CoorDescentConfig::iterations(
        n_iters,
        eps,
        case.config_f64("eps_init")?,
        case.config_f64("eps_decay")?.unwrap_or(1.0),
    );
    let scores = float::<B, 2>(case.tensor("in.s")?, &device).require_grad();
    let mask = case.optional("in.mask").map(|m| mask::<B, 2>(m, &device));
    let k: RowK<B> = match case.optional("in.k") {
        Some(k) => RowK::PerRow(float::<B, 1>(k, &device)),
        None => RowK::Scalar(case.config_f64("k")?.unwrap_or(0.0)),
    };
    let output = coor_descent(scores.clone(), k, mask, &config)?;
    let cotangent = float::<B, 2>(case.tensor("cot.scores")?, &device);
    let grads = (output.clone() * cotangent).sum().backward();
    let d_scores = scores.grad(&grads).expect("scores require grad");

    let (out_tol, grad_tol) = tolerances(precision, Some(eps), false);
    Ok(vec![
        compare(
            "out.scores",
            output.into_data(),
            case.tensor("out.scores")?,
            out_tol,
        ),
        compare(
            "grad.in.s",
            d_scores.into_data(),
            case.tensor("grad.in.s")?,
            grad_tol,
        ),
    ])
}

/// A usize from the config, or `default` when absent.
fn config_usize(case: &Case, name: &str, default: usize) -> crate::Result<usize> {
    Ok(case.config_f64(name)?.map_or(default, |v| v as usize))
}

/// Modules of one input `[batch, seq, dim]` and one output: RMSNorm, FeedForward,
/// SelfAttention.
fn layer_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let dim = config_usize(case, "dim", 0)?;
    let input_key = if case.optional("in.input").is_some() {
        "input"
    } else {
        "x"
    };
    let x = float::<B, 3>(case.tensor(&format!("in.{input_key}"))?, &device).require_grad();
    let state = StateDict::from_case(case);
    let tolerance = tolerances(precision, None, true);
    let input = (&x, input_key);
    match case.module.as_str() {
        "RMSNorm" => {
            let module = state.load_into(RmsNormConfig::new(dim).init::<B>(&device))?;
            compare_module(case, &module, module.forward(x.clone()), input, tolerance)
        }
        "FeedForward" => {
            let mult = case.config_f64("mult")?.unwrap_or(4.0);
            let config = FeedForwardConfig::new(dim).with_mult(mult);
            let module = state.load_into(config.init::<B>(&device))?;
            compare_module(case, &module, module.forward(x.clone()), input, tolerance)
        }
        _ => {
            let config = SelfAttentionConfig::new(dim)
                .with_dim_head(config_usize(case, "dim_head", 64)?)
                .with_heads(config_usize(case, "heads", 8)?)
                .with_prenorm(config_bool(case, "prenorm", false));
            let module = state.load_into(config.init::<B>(&device))?;
            compare_module(case, &module, module.forward(x.clone())?, input, tolerance)
        }
    }
}

fn attend_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let config = AttendConfig::new()
        .with_causal(config_bool(case, "causal", false))
        .with_scale(case.config_f64("scale")?);
    let q = float::<B, 4>(case.tensor("in.q")?, &device).require_grad();
    let [batch, heads, _, _] = q.dims();
    // A 3-D key/value tensor is shared by every head.
    let kv = |name: &str| -> crate::Result<(Leaf<B>, Tensor<B, 4>)> {
        let stored = case.tensor(name)?;
        Ok(if stored.shape.len() == 3 {
            let leaf = float::<B, 3>(stored, &device).require_grad();
            let [_, keys, dim_head] = leaf.dims();
            let shared = leaf
                .clone()
                .unsqueeze_dim::<4>(1)
                .expand([batch, heads, keys, dim_head]);
            (Leaf::Shared(leaf), shared)
        } else {
            let leaf = float::<B, 4>(stored, &device).require_grad();
            (Leaf::PerHead(leaf.clone()), leaf)
        })
    };
    let (k_leaf, k) = kv("in.k")?;
    let (v_leaf, v) = kv("in.v")?;
    let mask = case.optional("in.mask").map(|m| mask::<B, 4>(m, &device));
    let output = config.init().forward(q.clone(), k, v, mask)?;
    let cotangent = float::<B, 4>(case.tensor("cot.out")?, &device);
    let grads = (output.clone() * cotangent).sum().backward();
    let (out_tol, grad_tol) = tolerances(precision, None, true);
    let mut comparisons = vec![compare(
        "out.out",
        output.into_data(),
        case.tensor("out.out")?,
        out_tol,
    )];
    for (name, leaf) in [("q", Leaf::PerHead(q)), ("k", k_leaf), ("v", v_leaf)] {
        let key = format!("grad.in.{name}");
        comparisons.push(compare(
            &key,
            leaf.grad(&grads),
            case.tensor(&key)?,
            grad_tol,
        ));
    }
    Ok(comparisons)
}

fn config_bool(case: &Case, name: &str, default: bool) -> bool {
    case.config
        .get(name)
        .and_then(|v| v.as_bool())
        .unwrap_or(default)
}

fn router_config(case: &Case) -> crate::Result<CoordinateDescentRouterConfig> {
    let mut config = CoordinateDescentRouterConfig::new(config_usize(case, "dim", 0)?)
        .with_straight_through(config_bool(case, "straight_through", true))
        .with_cosine_sim_routing(config_bool(case, "cosine_sim_routing", false))
        .with_num_routing_tokens(config_usize(case, "num_routing_tokens", 1)?)
        .with_n_iters(config_usize(case, "n_iters", 20)?);
    if let Some(eps) = case.config_f64("eps")? {
        config = config.with_eps(eps);
    }
    if case.config.get("eps_init").is_some() {
        config = config.with_eps_init(case.config_f64("eps_init")?);
    }
    if let Some(decay) = case.config_f64("eps_decay")? {
        config = config.with_eps_decay(decay);
    }
    if let Some(ratio) = case.config_f64("fetch_k_ratio")? {
        config = config.with_fetch_k_ratio(ratio);
    }
    if let Some(scale) = case.config_f64("cosine_sim_scale")? {
        config = config.with_cosine_sim_scale(scale);
    }
    Ok(config)
}

/// The router: index sets per row, then scores, routed tokens and mask aligned to the
/// reference's order of indices (ties at score 1 come in arbitrary order), and gradients.
fn router_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let config = router_config(case)?;
    let eps = config.eps;
    let router = StateDict::from_case(case).load_into(config.init::<B>(&device)?)?;
    let num_tokens = case
        .call
        .get("num_tokens")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    let x = float::<B, 3>(case.tensor("in.x")?, &device).require_grad();
    let options = RouteOptions {
        mask: case.optional("in.mask").map(|m| mask::<B, 2>(m, &device)),
        ..Default::default()
    };
    let routed = router.forward(x.clone(), num_tokens, options)?;
    let [batch, routes, count, dim] = routed.routed_tokens.dims();
    let (out_tol, grad_tol) = tolerances(precision, Some(eps), true);
    let mut comparisons = Vec::new();
    let (mut scores, mut tokens, mut routed_mask) =
        (routed.scores, routed.routed_tokens, routed.routed_mask);
    if let (Some(ours), Some(reference)) = (&routed.indices, case.optional("out.indices")) {
        let ours: Vec<i64> = ours.to_data().convert::<i64>().to_vec().unwrap_or_default();
        let (order, mismatches) = alignment(&ours, &reference.values, count);
        comparisons.push(index_sets(mismatches));
        let order =
            Tensor::<B, 3, Int>::from_data(TensorData::new(order, [batch, routes, count]), &device);
        scores = scores.gather(2, order.clone());
        routed_mask = routed_mask.map(|m| m.int().gather(2, order.clone()).equal_elem(1));
        let order = order
            .unsqueeze_dim::<4>(3)
            .expand([batch, routes, count, dim]);
        tokens = tokens.gather(2, order);
    }
    // The reference has no route axis for a single route; ours always has one.
    let shaped = |t: TensorData, key: &str| -> crate::Result<TensorData> {
        let reference = case.tensor(key)?;
        if t.num_elements() != reference.values.len() {
            return Ok(t);
        }
        let values = t.convert::<f64>().to_vec::<f64>().unwrap_or_default();
        Ok(TensorData::new(values, reference.shape.clone()))
    };
    let mut loss = (tokens.clone()
        * float::<B, 4>(
            &with_route_axis(case.tensor("cot.routed_tokens")?, routes),
            &device,
        ))
    .sum();
    if let Some(cot) = case.optional("cot.scores") {
        loss =
            loss + (scores.clone() * float::<B, 3>(&with_route_axis(cot, routes), &device)).sum();
    }
    comparisons.push(compare(
        "out.scores",
        shaped(scores.into_data(), "out.scores")?,
        case.tensor("out.scores")?,
        out_tol,
    ));
    comparisons.push(compare(
        "out.routed_tokens",
        shaped(tokens.into_data(), "out.routed_tokens")?,
        case.tensor("out.routed_tokens")?,
        out_tol,
    ));
    if let (Some(ours), Some(reference)) = (routed_mask, case.optional("out.routed_mask")) {
        let ours = shaped(ours.float().into_data(), "out.routed_mask")?;
        comparisons.push(compare("out.routed_mask", ours, reference, 0.0));
    }
    let grads = loss.backward();
    let grad_x = x.grad(&grads).expect("x requires grad").into_data();
    comparisons.push(compare(
        "grad.in.x",
        grad_x,
        case.tensor("grad.in.x")?,
        grad_tol,
    ));
    let params = torch_params(&router, Gradients::<B>(&grads));
    comparisons.extend(compare_params(case, params, grad_tol)?);
    Ok(comparisons)
}

/// The routed attention options of a case whose token counts are under `num_q`/`num_kv`.
fn attention_config(
    case: &Case,
    router: &CoordinateDescentRouterConfig,
    (num_q, num_kv): (&str, &str),
) -> crate::Result<ConditionalRoutedAttentionConfig> {
    Ok(ConditionalRoutedAttentionConfig::new(
        config_usize(case, "dim", 0)?,
        config_usize(case, num_q, 0)?,
        config_usize(case, num_kv, 0)?,
    )
    .with_num_routed_kv(config_usize(case, "num_routed_kv", 1)?)
    .with_light_dim_head(config_usize(case, "light_dim_head", 64)?)
    .with_light_heads(config_usize(case, "light_heads", 8)?)
    .with_light_window_size(config_usize(case, "light_window_size", 128)?)
    .with_heavy_dim_head(config_usize(case, "heavy_dim_head", 64)?)
    .with_heavy_heads(config_usize(case, "heavy_heads", 8)?)
    .with_multiply_keys_by_score(config_bool(case, "multiply_keys_by_score", false))
    .with_multiply_queries_by_score(config_bool(case, "multiply_queries_by_score", false))
    .with_use_null_q_tokens(config_bool(case, "use_null_q_tokens", true))
    .with_rotary_emb(config_bool(case, "rotary_emb", false))
    .with_router(router.clone().with_straight_through(config_bool(
        case,
        "router_straight_through",
        true,
    ))))
}

/// Routed layers: `x: [batch, n, dim]` and an optional mask in, `out` back.
fn routed_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let router = router_config(case)?.with_straight_through(config_bool(
        case,
        "router_straight_through",
        true,
    ));
    let x = float::<B, 3>(case.tensor("in.x")?, &device).require_grad();
    let mask = case.optional("in.mask").map(|m| mask::<B, 2>(m, &device));
    let state = StateDict::from_case(case);
    let dim = config_usize(case, "dim", 0)?;
    let rotary = config_bool(case, "rotary_emb", false);
    let attention = |counts| attention_config(case, &router, counts);
    let feed_forward = |num: &str| -> crate::Result<ConditionalRoutedFeedForwardConfig> {
        let mut config = ConditionalRoutedFeedForwardConfig::new(dim, config_usize(case, num, 0)?)
            .with_router(router.clone());
        if let Some(mult) = case.config_f64("light_ff_mult")? {
            config = config.with_light_ff_mult(mult);
        }
        if let Some(mult) = case.config_f64("heavy_ff_mult")? {
            config = config.with_heavy_ff_mult(mult);
        }
        Ok(config)
    };
    let tolerance = match (precision, rotary) {
        // The reference computes rotary tables in f32 (ours are f64): in f64 the comparison is
        // limited to f32 rounding of the angles.
        (Precision::F64, true) => (1e-6, 1e-6),
        _ => tolerances(precision, Some(router.eps), true),
    };
    let input = (&x, "x");
    let heavy_counts = ("num_heavy_tokens_q", "num_heavy_tokens_kv");
    match case.module.as_str() {
        "ConditionalRoutedFeedForward" => {
            let module = state.load_into(feed_forward("num_heavy_tokens")?.init::<B>(&device)?)?;
            let output = module.forward(x.clone(), mask, None)?;
            compare_module(case, &module, output, input, tolerance)
        }
        "ConditionalRoutedAttention" => {
            let module = state.load_into(attention(heavy_counts)?.init::<B>(&device)?)?;
            let output = module.forward(x.clone(), mask)?;
            compare_module(case, &module, output, input, tolerance)
        }
        "ConditionalRoutedAutoregressiveAttention" => {
            let heavy_window = case
                .config
                .get("heavy_window_size")
                .and_then(|v| v.as_u64());
            let config =
                ConditionalRoutedAutoregressiveAttentionConfig::new(attention(heavy_counts)?)
                    .with_heavy_window_size(heavy_window.map(|w| w as usize));
            let module = state.load_into(config.init::<B>(&device)?)?;
            let output = module.forward(x.clone(), false)?;
            compare_module(case, &module, output, input, tolerance)
        }
        _ => {
            let config = ConditionalRoutedTransformerBlockConfig::new(
                attention(("num_heavy_attn_tokens_q", "num_heavy_attn_tokens_kv"))?,
                feed_forward("num_heavy_ff_tokens")?,
            );
            let module = state.load_into(config.init::<B>(&device)?)?;
            let output = module.forward(x.clone(), mask)?;
            compare_module(case, &module, output, input, tolerance)
        }
    }
}

/// `ConditionalRoutedImageAttention`: `x: [batch, height, width, dim]` (or channel-first).
fn image_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let router = router_config(case)?;
    let config = ConditionalRoutedImageAttentionConfig::new(attention_config(
        case,
        &router,
        ("num_heavy_tokens_q", "num_heavy_tokens_kv"),
    )?)
    .with_channel_first(config_bool(case, "channel_first", false));
    let module = StateDict::from_case(case).load_into(config.init::<B>(&device)?)?;
    let x = float::<B, 4>(case.tensor("in.x")?, &device).require_grad();
    let output = module.forward(x.clone(), None)?;
    let tolerance = tolerances(precision, Some(router.eps), true);
    compare_module(case, &module, output, (&x, "x"), tolerance)
}

/// `ConditionalRoutedViT`: images in, logits out.
fn vit_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let size = |name| -> crate::Result<[usize; 2]> {
        let side = config_usize(case, name, 0)?;
        Ok([side, side])
    };
    let mut router = CoordinateDescentRouterConfig::new(0).with_eps(1.0);
    if let Some(eps) = case.config_f64("default_coor_descent_eps")? {
        router = router.with_eps(eps);
    }
    let mut config = ConditionalRoutedViTConfig::new(
        size("image_size")?,
        size("patch_size")?,
        config_usize(case, "num_classes", 0)?,
        config_usize(case, "dim", 0)?,
        config_usize(case, "depth", 0)?,
        config_usize(case, "attn_num_heavy_tokens_q", 0)?,
        config_usize(case, "attn_num_heavy_tokens_kv", 0)?,
        config_usize(case, "ff_num_heavy_tokens", 0)?,
    )
    .with_attn_heavy_dim_head(config_usize(case, "attn_heavy_dim_head", 0)?)
    .with_attn_heavy_heads(config_usize(case, "attn_heavy_heads", 0)?)
    .with_attn_light_dim_head(config_usize(case, "attn_light_dim_head", 0)?)
    .with_attn_light_heads(config_usize(case, "attn_light_heads", 0)?)
    .with_attn_light_window_size(config_usize(case, "attn_light_window_size", 0)?)
    .with_attn_num_routed_kv(config_usize(case, "attn_num_routed_kv", 1)?)
    .with_channels(config_usize(case, "channels", 3)?)
    .with_router(router);
    if let Some(mult) = case.config_f64("ff_heavy_mult")? {
        config = config.with_ff_heavy_mult(mult);
    }
    if let Some(mult) = case.config_f64("ff_light_mult")? {
        config = config.with_ff_light_mult(mult);
    }
    let eps = config.router.eps;
    let module = StateDict::from_case(case).load_into(config.init::<B>(&device)?)?;
    let images = float::<B, 4>(case.tensor("in.img")?, &device).require_grad();
    let output = module.forward(images.clone())?;
    let tolerance = tolerances(precision, Some(eps), true);
    compare_module(case, &module, output, (&images, "img"), tolerance)
}

fn local_mha_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    if config_bool(case, "use_rotary_pos_emb", true) {
        return Err(crate::Error::Format {
            path: case.path.display().to_string(),
            message: "LocalMHA with rotary embeddings is not supported (CoLT5 turns them off)"
                .into(),
        });
    }
    let device = Default::default();
    let mut config = LocalMhaConfig::new(
        config_usize(case, "dim", 0)?,
        config_usize(case, "window_size", 0)?,
    )
    .with_dim_head(config_usize(case, "dim_head", 64)?)
    .with_heads(config_usize(case, "heads", 8)?)
    .with_causal(config_bool(case, "causal", false))
    .with_prenorm(config_bool(case, "prenorm", false))
    .with_exact_windowsize(config_bool(case, "exact_windowsize", true))
    .with_look_backward(config_usize(case, "look_backward", 1)?);
    if let Some(look_forward) = case.config_f64("look_forward")? {
        config = config.with_look_forward(Some(look_forward as usize));
    }
    let module = StateDict::from_case(case).load_into(config.init::<B>(&device)?)?;
    let x = float::<B, 3>(case.tensor("in.x")?, &device).require_grad();
    let mask = case.optional("in.mask").map(|m| mask::<B, 2>(m, &device));
    let output = module.forward(x.clone(), mask)?;
    let tolerance = tolerances(precision, None, true);
    compare_module(case, &module, output, (&x, "x"), tolerance)
}

/// The differentiable top-k: index sets per row, the other outputs aligned to the
/// reference's order, and the input gradient.
fn topk_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let mut config = TopkConfig::new()
        .with_n_iters(config_usize(case, "n_iters", 20)?)
        .with_eps(case.config_f64("eps")?.unwrap_or(0.1))
        .with_eps_init(case.config_f64("eps_init")?)
        .with_eps_decay(case.config_f64("eps_decay")?.unwrap_or(1.0));
    if let Some(ratio) = case.config_f64("coor_descent_k_ratio")? {
        config = config.with_coor_descent_k_ratio(ratio);
    }
    let x = float::<B, 2>(case.tensor("in.x")?, &device).require_grad();
    let mask = case.optional("in.mask").map(|m| mask::<B, 2>(m, &device));
    let k = config_usize(case, "k", 0)?;
    let out = topk(x.clone(), k, mask, &config)?;
    let [rows, _] = out.values.dims();
    let ours: Vec<i64> = out
        .indices
        .to_data()
        .convert::<i64>()
        .to_vec()
        .unwrap_or_default();
    let (order, mismatches) = alignment(&ours, &case.tensor("out.indices")?.values, k);
    let order = Tensor::<B, 2, Int>::from_data(TensorData::new(order, [rows, k]), &device);
    let align = |t: Tensor<B, 2>| t.gather(1, order.clone());
    let values = align(out.values);
    let (out_tol, grad_tol) = tolerances(precision, Some(config.eps), true);
    let mut comparisons = vec![index_sets(mismatches)];
    let soft = [
        ("out.coor_descent_values", out.coor_descent_values),
        ("out.gates", out.gates),
    ];
    for (key, ours) in soft {
        if let Some(ours) = ours {
            comparisons.push(compare(
                key,
                align(ours).into_data(),
                case.tensor(key)?,
                out_tol,
            ));
        }
    }
    let cotangent = float::<B, 2>(case.tensor("cot.values")?, &device);
    let grads = (values.clone() * cotangent).sum().backward();
    comparisons.push(compare(
        "out.values",
        values.into_data(),
        case.tensor("out.values")?,
        out_tol,
    ));
    let grad_x = x.grad(&grads).expect("x requires grad").into_data();
    comparisons.push(compare(
        "grad.in.x",
        grad_x,
        case.tensor("grad.in.x")?,
        grad_tol,
    ));
    Ok(comparisons)
}

/// `tensor` with a route axis of `routes` after the batch axis, if it lacks one.
/// The coordinate-descent-attention LM: token ids in, logits and parameter gradients out.
fn cd_lm_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let mut config = CdTransformerConfig::new(
        config_usize(case, "num_tokens", 0)?,
        config_usize(case, "dim", 0)?,
        config_usize(case, "seq_len", 0)?,
        config_usize(case, "depth", 0)?,
    )
    .with_dim_head(config_usize(case, "dim_head", 64)?)
    .with_heads(config_usize(case, "heads", 8)?)
    .with_attn_use_coor_descent(config_bool(case, "attn_use_coor_descent", false))
    .with_ff_use_coor_descent(config_bool(case, "ff_use_coor_descent", false))
    .with_coor_descent_iters(config_usize(case, "coor_descent_iters", 15)?)
    .with_attn_null_kv(config_usize(case, "attn_null_kv", 0)?)
    .with_learned_sparsity_k(config_bool(case, "learned_sparsity_k", false));
    for (name, set) in [
        (
            "ff_mult",
            CdTransformerConfig::with_ff_mult as fn(_, _) -> _,
        ),
        (
            "attn_coor_descent_sparsity_k",
            CdTransformerConfig::with_attn_coor_descent_sparsity_k,
        ),
        (
            "ff_coor_descent_sparsity_k",
            CdTransformerConfig::with_ff_coor_descent_sparsity_k,
        ),
        (
            "coor_descent_eps",
            CdTransformerConfig::with_coor_descent_eps,
        ),
    ] {
        if let Some(value) = case.config_f64(name)? {
            config = set(config, value);
        }
    }
    let eps = config.coor_descent_eps;
    let model = StateDict::from_case(case).load_into(config.init::<B>(&device)?)?;
    let tokens = case.tensor("in.x")?;
    let ids: Vec<i64> = tokens.values.iter().map(|&v| v as i64).collect();
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, tokens.shape.clone()), &device);
    let logits = model.forward(tokens)?;
    let (out_tol, grad_tol) = tolerances(precision, Some(eps), true);
    let cotangent = float::<B, 3>(case.tensor("cot.logits")?, &device);
    let grads = (logits.clone() * cotangent).sum().backward();
    let mut comparisons = vec![compare(
        "out.logits",
        logits.into_data(),
        case.tensor("out.logits")?,
        out_tol,
    )];
    let params = torch_params(&model, Gradients::<B>(&grads));
    comparisons.extend(compare_params(case, params, grad_tol)?);
    Ok(comparisons)
}

fn with_route_axis(tensor: &CaseTensor, routes: usize) -> CaseTensor {
    let mut tensor = tensor.clone();
    if routes == 1 {
        tensor.shape.insert(1, 1);
    }
    tensor
}

/// The comparison of index sets: `max_abs` counts the reference indices we did not select.
fn index_sets(mismatches: usize) -> Comparison {
    Comparison {
        name: "out.indices".into(),
        max_abs: mismatches as f64,
        relative: if mismatches == 0 { 0.0 } else { f64::INFINITY },
        tolerance: 0.0,
    }
}

/// For rows of `count` indices: the position in our row of each reference index (so that
/// gathering ours by it yields the reference's order), and how many reference indices our
/// row lacks.
fn alignment(ours: &[i64], reference: &[f64], count: usize) -> (Vec<i64>, usize) {
    let mut order = Vec::with_capacity(ours.len());
    let mut mismatches = 0;
    for (row, expected) in ours.chunks(count).zip(reference.chunks(count)) {
        for &index in expected {
            match row.iter().position(|&i| i as f64 == index) {
                Some(position) => order.push(position as i64),
                None => {
                    mismatches += 1;
                    order.push(0);
                }
            }
        }
    }
    (order, mismatches)
}

/// An attention input as the case stores it: per head, or shared by all heads.
enum Leaf<B: AutodiffBackend> {
    PerHead(Tensor<B, 4>),
    Shared(Tensor<B, 3>),
}

impl<B: AutodiffBackend> Leaf<B> {
    fn grad(&self, grads: &B::Gradients) -> TensorData {
        let missing = "attention inputs require grad";
        match self {
            Leaf::PerHead(t) => t.grad(grads).expect(missing).into_data(),
            Leaf::Shared(t) => t.grad(grads).expect(missing).into_data(),
        }
    }
}

/// Back-propagates Σ out·cot of a module with one input and compares `out.out`,
/// `grad.in.{input_key}` and every `grad.param.*` of the case.
fn compare_module<B: AutodiffBackend, M: Module<B>, const D: usize, const DI: usize>(
    case: &Case,
    module: &M,
    output: Tensor<B, D>,
    (input, input_key): (&Tensor<B, DI>, &str),
    (out_tol, grad_tol): (f64, f64),
) -> crate::Result<Vec<Comparison>> {
    let cotangent = float::<B, D>(case.tensor("cot.out")?, &output.device());
    let grads = (output.clone() * cotangent).sum().backward();
    let params = torch_params(module, Gradients::<B>(&grads));
    let mut comparisons = vec![compare(
        "out.out",
        output.into_data(),
        case.tensor("out.out")?,
        out_tol,
    )];
    let input_grad = input.grad(&grads).expect("input requires grad").into_data();
    let key = format!("grad.in.{input_key}");
    comparisons.push(compare(&key, input_grad, case.tensor(&key)?, grad_tol));
    comparisons.extend(compare_params(case, params, grad_tol)?);
    Ok(comparisons)
}

/// Compares every `grad.param.NAME` of the case with our gradient of that parameter.
fn compare_params(
    case: &Case,
    mut params: BTreeMap<String, TensorData>,
    tolerance: f64,
) -> crate::Result<Vec<Comparison>> {
    let mut comparisons = Vec::new();
    for (key, reference) in case.tensors.range("grad.param.".to_string()..) {
        let Some(name) = key.strip_prefix("grad.param.") else {
            break;
        };
        let ours = params.remove(name).ok_or_else(|| crate::Error::Format {
            path: case.path.display().to_string(),
            message: format!("our module has no parameter `{name}` (or it received no gradient)"),
        })?;
        comparisons.push(compare(key, ours, reference, tolerance));
    }
    Ok(comparisons)
}

/// Reads parameter gradients.
struct Gradients<'a, B: AutodiffBackend>(&'a B::Gradients);

impl<B: AutodiffBackend> ParamReader<B> for Gradients<'_, B> {
    type Output = B::InnerBackend;

    fn read<const D: usize>(
        &self,
        param: &Param<Tensor<B, D>>,
    ) -> Option<Tensor<B::InnerBackend, D>> {
        param.val().grad(self.0)
    }
}

fn float<B: burn::tensor::backend::Backend, const D: usize>(
    tensor: &CaseTensor,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(
        TensorData::new(tensor.values.clone(), tensor.shape.clone())
            .convert::<burn::tensor::ops::FloatElem<B>>(),
        device,
    )
}

fn mask<B: burn::tensor::backend::Backend, const D: usize>(
    tensor: &CaseTensor,
    device: &B::Device,
) -> Tensor<B, D, Bool> {
    let values: Vec<bool> = tensor.values.iter().map(|&v| v != 0.0).collect();
    Tensor::from_data(TensorData::new(values, tensor.shape.clone()), device)
}

/// Compares our tensor with the reference's; a shape mismatch is an infinite error.
fn compare(name: &str, ours: TensorData, reference: &CaseTensor, tolerance: f64) -> Comparison {
    let shape_matches = ours.shape.iter().eq(reference.shape.iter());
    let ours: Vec<f64> = ours.convert::<f64>().to_vec().unwrap_or_default();
    let (max_abs, relative) = if shape_matches && ours.len() == reference.values.len() {
        let max_abs = ours
            .iter()
            .zip(&reference.values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, |m: f64, d| {
                if d.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(d)
                }
            });
        let scale = reference.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        (
            max_abs,
            if scale > 0.0 {
                max_abs / scale
            } else {
                max_abs
            },
        )
    } else {
        (f64::INFINITY, f64::INFINITY)
    };
    Comparison {
        name: name.to_string(),
        max_abs,
        relative,
        tolerance,
    }
}
