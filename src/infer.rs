//! Inference: a trained model from a checkpoint, its weights used in place (memory
//! mapped, every byte range checksummed, no copy on the CPU path), classifying images
//! and evaluating data sets. Any checkpoint works, whatever layout it was saved under.

use crate::autograd::{Graph, ParamStore, Precision};
use crate::checkpoint::{Checkpoint, Weights};
use crate::data::{Dataset, Loader, Normalize, Sampler};
use crate::error::{Error, Result};
use crate::metrics::ConfusionMatrix;
use crate::nn::{ForwardCtx, Vit};
use crate::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model ready to classify.
pub struct Classifier {
    pub model: Vit,
    params: ParamStore,
    /// Class names (from the checkpoint; the class indices when it has none).
    pub classes: Vec<String>,
    /// Whether the checkpoint named its classes (see [`Classifier::align_classes`]).
    pub named_classes: bool,
    pub dir: PathBuf,
    /// The linear layers' arithmetic (see [`Classifier::to_device`]).
    precision: Precision,
    /// How the model's training images were normalised (from the checkpoint; CIFAR-10's
    /// for checkpoints that record none).
    pub norm: Normalize,
}

/// One class of a prediction.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Scored {
    pub index: usize,
    pub class: String,
    pub probability: f32,
}

impl Classifier {
    /// Loads the model of checkpoint `dir`: every weight present with its shape (the
    /// first that is not is named), viewed in place where it is stored as one F32
    /// chunk (read into memory otherwise).
    pub fn load(dir: &Path) -> Result<Classifier> {
        Classifier::load_weights(dir, Weights::Raw)
    }

    /// As [`Classifier::load`], with the trained weights or their EMA (`ema.<param>`;
    /// an error naming the checkpoint when it has none).
    pub fn load_weights(dir: &Path, weights: Weights) -> Result<Classifier> {
        let ckpt = Checkpoint::open(dir)?;
        let cfg = ckpt.index.model.clone();
        let mut params = ParamStore::new();
        let model = Vit::skeleton(&cfg, &mut params)?;
        for p in params.iter_mut() {
            let stored = ckpt.weight_name(&p.name, weights)?;
            let Some(entry) = ckpt.index.tensors.get(&stored) else {
                return Err(Error::Format {
                    path: dir.to_path_buf(),
                    msg: format!("the checkpoint has no `{stored}` for its model"),
                });
            };
            if entry.shape.as_slice() != p.value.dims() {
                return Err(Error::Format {
                    path: dir.to_path_buf(),
                    msg: format!(
                        "`{}` has shape {:?} in the checkpoint but {:?} in its model",
                        p.name,
                        entry.shape,
                        p.value.dims()
                    ),
                });
            }
            p.value = match ckpt.view(&stored) {
                Ok(t) => t,
                Err(_) => ckpt.read(&stored)?.to_dtype(crate::tensor::DType::F32),
            };
            crate::checkpoint::check_finite(dir, &stored, &p.value)?;
        }
        let saved = &ckpt.index.training.classes;
        let named_classes = saved.len() == cfg.num_classes;
        let classes = match named_classes {
            true => saved.clone(),
            false => (0..cfg.num_classes).map(|i| i.to_string()).collect(),
        };
        Ok(Classifier {
            model,
            params,
            classes,
            named_classes,
            dir: dir.to_path_buf(),
            precision: Precision::F32,
            norm: ckpt.index.training.normalize,
        })
    }

    /// Moves the weights to `device` (copies of the mapped ones; on the CPU they stay
    /// in place) and computes there in `precision`; images follow.
    pub fn to_device(&mut self, device: Device, precision: Precision) -> Result<()> {
        if device != self.device() {
            self.params.to_device(device)?;
        }
        self.precision = precision;
        Ok(())
    }

    fn device(&self) -> Device {
        self.params
            .iter()
            .next()
            .map_or(Device::Cpu, |p| p.value.device())
    }

    /// Whether every weight is a view of the checkpoint's files (no copy).
    pub fn weights_in_place(&self) -> bool {
        self.params.iter().all(|p| p.value.is_mapped())
    }

    /// The side of the images the model takes (the checkpoint's image size).
    pub fn image_size(&self) -> usize {
        self.model.config.image_size
    }

    /// Images from files brought to the model's size and normalised as its training
    /// images were ([`load_images`]).
    pub fn load_images(&self, paths: &[PathBuf]) -> Result<Tensor> {
        load_images(paths, self.image_size(), &self.norm)
    }

    /// A data set brought to the model's image size (bilinear, as training brought it)
    /// and normalised as its training images were.
    pub fn prepare(&self, data: Dataset) -> Dataset {
        data.resized(self.image_size()).with_norm(self.norm)
    }

    /// Class probabilities `[b, classes]` of normalised images `[b, 3, S, S]`.
    pub fn probabilities(&mut self, images: Tensor) -> Result<Tensor> {
        let b = images.dims().first().copied().unwrap_or(0);
        let images = images.to_device(self.device())?;
        let mut g = Graph::new(&mut self.params);
        g.set_precision(self.precision);
        let logits = self.model.forward(&mut g, images, &ForwardCtx::eval(b))?;
        let logits = g.value(logits).to_device(Device::Cpu)?;
        let c = logits.shape().last();
        let mut p = logits.to_vec_f32();
        crate::backend::cpu::simd::softmax_rows(&mut p, c, 1.0);
        Tensor::from_vec(p, [b, c])
    }

    /// The `k` most probable classes of each image, most probable first.
    pub fn top_k(&mut self, images: Tensor, k: usize) -> Result<Vec<Vec<Scored>>> {
        let probs = self.probabilities(images)?;
        let c = probs.shape().last();
        Ok(probs
            .f32s()?
            .chunks(c)
            .map(|row| {
                let mut order: Vec<usize> = (0..c).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                order
                    .into_iter()
                    .take(k)
                    .map(|i| Scored {
                        index: i,
                        class: self.classes[i].clone(),
                        probability: row[i],
                    })
                    .collect()
            })
            .collect())
    }

    /// Brings a data set's labels to the model's classes. Its class names are first
    /// renamed by `map` (`(data name, model name)` pairs, all at once, so two names can
    /// swap); none may then appear twice. When
    /// the checkpoint names its classes (or `map` is given), each data class must be
    /// one of the model's, and the labels are renumbered to the model's order, so the
    /// same class set listed in another order is evaluated correctly; otherwise only
    /// the number of classes must agree. Any mismatch lists both name lists.
    pub fn align_classes(&self, data: &mut Dataset, map: &[(String, String)]) -> Result<()> {
        rename_classes(&mut data.classes, map)?;
        if let Some(dup) = crate::data::first_duplicate(&data.classes) {
            return Err(Error::Config(format!(
                "the data's class names {:?} name {dup:?} twice",
                data.classes
            )));
        }
        let by_name = self.named_classes || !map.is_empty();
        let index: Vec<Option<usize>> = data
            .classes
            .iter()
            .map(|c| match by_name {
                true => self.classes.iter().position(|m| m == c),
                false => None,
            })
            .collect();
        let matches = data.classes.len() == self.classes.len()
            && (!by_name || index.iter().all(Option::is_some));
        if !matches {
            return Err(Error::Config(format!(
                "the data's {} classes {:?} do not match the checkpoint's {} classes {:?}{}",
                data.classes.len(),
                data.classes,
                self.classes.len(),
                self.classes,
                match by_name {
                    true => " (map data classes to the model's with --class-map DATA=MODEL)",
                    false => "",
                }
            )));
        }
        if by_name {
            let index: Vec<u8> = index.into_iter().flatten().map(|i| i as u8).collect();
            for l in &mut data.labels {
                *l = index[*l as usize];
            }
            data.classes = self.classes.clone();
        }
        Ok(())
    }

    /// The confusion matrix of the model on a data set, in batches of `batch`
    /// (loaded on background threads; the model runs on every core). The data's
    /// classes are aligned with the model's first ([`Classifier::align_classes`]), its
    /// images brought to the model's size and normalisation ([`Classifier::prepare`]).
    pub fn evaluate(&mut self, data: Dataset, batch: usize) -> Result<ConfusionMatrix> {
        let mut data = self.prepare(data);
        self.align_classes(&mut data, &[])?;
        let classes = self.model.config.num_classes;
        let n = data.len();
        let loader = Loader::new(Arc::new(data), Sampler::new(n, false, 0), batch)?;
        let mut confusion = ConfusionMatrix::new(classes);
        for b in loader.epoch(0) {
            let b = b?;
            let probs = self.probabilities(b.images)?;
            let predictions = crate::engine::argmax_rows(&probs)?;
            confusion.add(&b.labels, &predictions);
        }
        Ok(confusion)
    }
}

/// Renames `classes` by `(from, to)` pairs, each `from` one of the original names.
fn rename_classes(classes: &mut [String], map: &[(String, String)]) -> Result<()> {
    let original = classes.to_vec();
    for (k, (from, to)) in map.iter().enumerate() {
        let flag = format!("--class-map {from:?}={to:?}");
        if map[..k].iter().any(|(f, _)| f == from) {
            return Err(Error::Config(format!("{flag}: {from:?} is mapped twice")));
        }
        let Some(i) = original.iter().position(|c| c == from) else {
            return Err(Error::Config(format!(
                "{flag}: the data has no class {from:?} (its classes: {original:?})"
            )));
        };
        classes[i] = to.clone();
    }
    Ok(())
}

/// Images from files (PNG/JPEG, any size: the shorter side resized to `side`, then the
/// centre cropped, as the image-folder reader does), normalised by `norm`:
/// `[n, 3, side, side]`. The first file that cannot be read or decoded is named.
pub fn load_images(paths: &[PathBuf], side: usize, norm: &Normalize) -> Result<Tensor> {
    let mut out = Vec::with_capacity(paths.len() * 3 * side * side);
    for p in paths {
        let img = crate::data::folder::load_image_at(p, side)?;
        crate::data::transforms::normalize_into(&img, &norm.mean, &norm.std, &mut out);
    }
    Tensor::from_vec(out, [paths.len(), 3, side, side])
}
