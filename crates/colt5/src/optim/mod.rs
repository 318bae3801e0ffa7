//! Adam with each parameter's step fused: burn's `Adam` runs about thirteen tensor
//! operations per parameter tensor and step (the two moments, the bias-corrected update,
//! the subtraction), each a kernel launch on a GPU; [`AdamBackend`] lets a backend run them
//! as one. CubeCL backends launch the kernel of `colt5-kernels`, `Flex` runs one loop
//! (`cpu.rs`); other backends compose burn's operations. The state is burn's
//! [`AdamState`] record, so checkpoints written with burn's `Adam` load unchanged, and the
//! arithmetic is burn's, in its order.

mod cpu;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube;

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamState, AdaptiveMomentumState, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// Configuration of [`Adam`]; defaults are burn's `AdamConfig`'s (PyTorch's ε is 1e-8).
#[derive(Config, Debug)]
pub struct AdamConfig {
    /// Decay of the first moment. Default 0.9.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Decay of the second moment. Default 0.999.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// Added to the root of the bias-corrected second moment. Default 1e-5.
    #[config(default = 1e-5)]
    pub epsilon: f32,
}

/// Adam (no weight decay, no AMSGrad), one fused operation per parameter tensor and step.
#[derive(Clone, Debug)]
pub struct Adam {
    config: AdamConfig,
}

/// The scalars of step t (1-based) at learning rate `lr`, as burn's `Adam` computes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Learning rate (f64, as burn's scalar operations take it).
    pub lr: f64,
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// `√(1 − β₂ᵗ) / (1 − β₁ᵗ)`.
    pub factor: f32,
    /// `ε · √(1 − β₂ᵗ)`.
    pub epsilon: f32,
}

impl AdamStep {
    fn new(config: &AdamConfig, lr: f64, time: usize) -> Self {
        let time = time as i32;
        let correction_2 = (1.0 - config.beta_2.powi(time)).sqrt();
        AdamStep {
            lr,
            beta_1: config.beta_1,
            beta_2: config.beta_2,
            factor: correction_2 / (1.0 - config.beta_1.powi(time)),
            epsilon: config.epsilon * correction_2,
        }
    }
}

/// Backends that may fuse an Adam step. Tensors are flat (`[len]`); the default fuses
/// nothing.
pub trait AdamBackend: Backend {
    /// The new parameter and moments `[param, m₁, m₂]` after one step from `moments`
    /// (`None` at the first step: both 0), or `None` without a fused kernel.
    fn adam_step(
        _param: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        _step: &AdamStep,
    ) -> Option<[FloatTensor<Self>; 3]> {
        None
    }
}

impl_for_ndarray!(AdamBackend {});

/// Optimizers step the inner backend's tensors: an autodiff backend fuses nothing itself.
impl<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> AdamBackend
    for burn::backend::Autodiff<B, C>
{
}

impl AdamBackend for burn::backend::Flex {
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        step: &AdamStep,
    ) -> Option<[FloatTensor<Self>; 3]> {
        cpu::adam_step(param, grad, moments, step)
    }
}

impl AdamConfig {
    /// The optimizer for the parameters of `M`, through burn's adaptor.
    pub fn init<B, M>(&self) -> OptimizerAdaptor<Adam, M, B>
    where
        B: AutodiffBackend,
        B::InnerBackend: AdamBackend,
        M: AutodiffModule<B>,
    {
        OptimizerAdaptor::from(Adam {
            config: self.clone(),
        })
    }
}

impl<B: AdamBackend> SimpleOptimizer<B> for Adam {
    type State<const D: usize> = AdamState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let time = state.as_ref().map_or(0, |state| state.momentum.time) + 1;
        let step = AdamStep::new(&self.config, lr, time);
        let moments = state.map(|state| (state.momentum.moment_1, state.momentum.moment_2));
        let dims = tensor.dims();
        let len: usize = dims.iter().product();
        let flat = |t: Tensor<B, D>| t.reshape([len]).into_primitive().tensor();
        let fused = B::adam_step(
            flat(tensor.clone()),
            flat(grad.clone()),
            moments.clone().map(|(m1, m2)| (flat(m1), flat(m2))),
            &step,
        );
        let [tensor, moment_1, moment_2] = match fused {
            Some(outputs) => outputs
                .map(|t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)).reshape(dims)),
            None => composed(tensor, grad, moments, &step),
        };
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (tensor, Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

/// [`AdamBackend::adam_step`] from tensor operations, in burn's order.
fn composed<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
    step: &AdamStep,
) -> [Tensor<B, D>; 3] {
    let first = grad.clone().mul_scalar(1.0 - step.beta_1);
    let second = grad.square().mul_scalar(1.0 - step.beta_2);
    let (moment_1, moment_2) = match moments {
        Some((m1, m2)) => (
            m1.mul_scalar(step.beta_1).add(first),
            m2.mul_scalar(step.beta_2).add(second),
        ),
        None => (first, second),
    };
    let update = moment_1
        .clone()
        .mul_scalar(step.factor)
        .div(moment_2.clone().sqrt().add_scalar(step.epsilon));
    [tensor - update.mul_scalar(step.lr), moment_1, moment_2]
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex, NdArray};
    use burn::module::{Module, Param};
    use burn::optim::{GradientsParams, Optimizer};
    use burn::tensor::backend::{AutodiffBackend, Backend};
    use burn::tensor::{Tensor, TensorData};

    #[derive(Module, Debug)]
    struct Weights<B: Backend> {
        w: Param<Tensor<B, 2>>,
    }

    /// Deterministic values in (−1.5, 1.8).
    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count)
            .map(|i| ((i * 37 + seed * 11) % 23) as f32 / 7.0 - 1.5)
            .collect()
    }

    /// The weights after three steps of `optimizer` on sum(w² · c) (an elementwise loss:
    /// the same gradients 2·w·c on every backend and run) from fixed weights, at a rising
    /// learning rate.
    fn train<B: AutodiffBackend>(mut optimizer: impl Optimizer<Weights<B>, B>) -> Vec<f32> {
        let device = Default::default();
        let tensor =
            |seed| Tensor::<B, 2>::from_data(TensorData::new(values(30, seed), [6, 5]), &device);
        let mut weights = Weights {
            w: Param::from_tensor(tensor(1)),
        };
        let c = tensor(2);
        for step in 0..3 {
            let loss = (weights.w.val().powf_scalar(2.0) * c.clone()).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &weights);
            weights = optimizer.step(1e-2 * (step + 1) as f64, weights, grads);
        }
        let trained = weights
            .w
            .val()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap();
        assert_ne!(trained, values(30, 1), "the steps moved the weights");
        trained
    }

    #[test]
    fn fused_adam_repeats_burns_adam_bit_for_bit() {
        type Cpu = Autodiff<Flex>;
        type Reference = Autodiff<NdArray<f32>>;
        let burn_flex = train::<Cpu>(burn::optim::AdamConfig::new().init());
        let fused_flex = train::<Cpu>(super::AdamConfig::new().init());
        assert_eq!(fused_flex, burn_flex);
        let burn_ndarray = train::<Reference>(burn::optim::AdamConfig::new().init());
        let composed = train::<Reference>(super::AdamConfig::new().init());
        assert_eq!(composed, burn_ndarray);
    }
}
