//! Trains a small routed ViT on synthetic images for a few steps and prints the loss.
//!
//! Each 32×32 image is noise plus a bright 8×8 square somewhere; the class is the colour
//! channel the square is drawn in (or all three). Run with `cargo run --release -p colt5 --example vit`.

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{backend::Backend, Device, Distribution, Int, Tensor, TensorData};
use colt5::vit::ConditionalRoutedViTConfig;

type B = Autodiff<NdArray<f32>>;

const SIZE: usize = 32;
const CLASSES: usize = 4;

/// A batch of images `[batch, 3, 32, 32]` and their classes: noise plus a bright 8×8
/// square at a varying place, in colour channel `class` (class 3: in every channel).
fn batch(size: usize, step: usize, device: &Device<B>) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let classes: Vec<i64> = (0..size)
        .map(|i| ((i * 7 + step * 3) % CLASSES) as i64)
        .collect();
    let mut squares = vec![0f32; size * 3 * SIZE * SIZE];
    for (i, &class) in classes.iter().enumerate() {
        let (top, left) = ((i * 5 + step) % 24, (i * 11 + step * 7) % 24);
        let channels = match class {
            3 => 0..3,
            c => c as usize..c as usize + 1,
        };
        for c in channels {
            for y in top..top + 8 {
                let row = ((i * 3 + c) * SIZE + y) * SIZE;
                squares[row + left..row + left + 8].fill(2.0);
            }
        }
    }
    let noise = Tensor::<B, 4>::random(
        [size, 3, SIZE, SIZE],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let images = noise + Tensor::from_data(TensorData::new(squares, [size, 3, SIZE, SIZE]), device);
    (
        images,
        Tensor::from_data(TensorData::new(classes, [size]), device),
    )
}

fn main() -> colt5::Result<()> {
    let device = Default::default();
    B::seed(&device, 0);
    // 4×4 patches of 8×8 pixels, attention windows of 2×2 patches.
    let mut model = ConditionalRoutedViTConfig::new([SIZE, SIZE], [8, 8], CLASSES, 64, 2, 2, 2, 8)
        .with_attn_light_window_size(2)
        .with_attn_heavy_dim_head(16)
        .with_attn_heavy_heads(4)
        .with_attn_light_dim_head(16)
        .with_attn_light_heads(4)
        .init::<B>(&device)?;
    let mut optimizer = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let (eval_images, eval_classes) = batch(64, 1000, &device);
    let eval_loss = |model: &colt5::vit::ConditionalRoutedViT<B>| -> colt5::Result<f32> {
        let valid = model.valid();
        let logits = valid.forward(eval_images.clone().inner())?;
        let loss = CrossEntropyLossConfig::new()
            .init(&device)
            .forward(logits, eval_classes.clone().inner());
        Ok(loss.into_scalar())
    };
    println!("step   0  held-out loss {:.4}", eval_loss(&model)?);
    for step in 1..=40 {
        let (images, classes) = batch(16, step, &device);
        let loss = loss_fn.forward(model.forward(images)?, classes);
        let train_loss: f32 = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(1e-3, model, grads);
        if step % 10 == 0 {
            println!(
                "step {step:3}  train loss {train_loss:.4}  held-out loss {:.4}",
                eval_loss(&model)?
            );
        }
    }
    Ok(())
}
