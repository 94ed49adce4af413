//! The `ferrovit` command line.

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferrovit::backend::cpu;
use ferrovit::data::{default_data_dir, Augment, Dataset, Loader, Sampler};
use ferrovit::engine::{BatchStats, Engine, TrainConfig};
use ferrovit::metrics::ConfusionMatrix;
use ferrovit::nn::PRESETS;
use ferrovit::optim::LrSchedule;
use ferrovit::rng::Rng;
use ferrovit::{Error, Result, Tensor, VitConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "ferrovit",
    version,
    about = "Train Vision Transformers on CIFAR-10-style data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a ViT (default: a small ViT on the embedded digits data)
    Train(TrainArgs),
    /// Time training steps of a model on random data (images/s)
    Bench(BenchArgs),
    /// List the model presets and their parameter counts
    Presets,
}

#[derive(Args)]
struct ModelArgs {
    /// Model preset (see `ferrovit presets`); overrides the dimension flags
    #[arg(long)]
    preset: Option<String>,
    /// Embedding width
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Number of transformer blocks
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Attention heads (must divide --dim)
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// MLP hidden width
    #[arg(long, default_value_t = 256)]
    mlp_dim: usize,
    /// Dropout probability
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// CPU threads (default: one per core)
    #[arg(long)]
    threads: Option<usize>,
}

impl ModelArgs {
    fn config(&self, num_classes: usize) -> Result<VitConfig> {
        let mut cfg = match &self.preset {
            Some(p) => VitConfig::preset(p)?,
            None => VitConfig {
                dim: self.dim,
                depth: self.depth,
                heads: self.heads,
                mlp_dim: self.mlp_dim,
                ..VitConfig::preset(PRESETS[0])?
            },
        };
        cfg.num_classes = num_classes;
        cfg.dropout = self.dropout;
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_threads(&self) -> Result<()> {
        if let Some(n) = self.threads {
            if n == 0 {
                return Err(Error::Config("--threads must be at least 1".into()));
            }
            cpu::set_num_threads(n)?;
        }
        Ok(())
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Directory with CIFAR-10 binary files (default: the embedded digits data)
    #[arg(long)]
    data: Option<PathBuf>,
    /// Passes over the training set
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Images per step
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate (AdamW)
    #[arg(long, default_value_t = 2e-3)]
    lr: f32,
    /// Linear warm-up length in epochs, before cosine decay
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// AdamW decoupled weight decay
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f32,
    /// Label smoothing of the cross-entropy loss, in [0, 1]
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// Seed of initialisation, data order and dropout
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training augmentation: `crop` is a random crop of the image zero-padded by 4,
    /// `crop-flip` adds random horizontal flips (off by default: digits are not
    /// mirror-symmetric)
    #[arg(long, value_enum, default_value_t = AugmentArg::None)]
    augment: AugmentArg,
    /// Output directory (per-epoch metrics as JSON lines in metrics.jsonl)
    #[arg(long, default_value = "out")]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum AugmentArg {
    None,
    Crop,
    CropFlip,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images per step
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed steps
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => train(a),
        Command::Bench(a) => bench(a),
        Command::Presets => presets(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn presets() -> Result<()> {
    println!(
        "{:<28} {:>5} {:>6} {:>6} {:>8} {:>12}",
        "preset", "dim", "depth", "heads", "mlp_dim", "params"
    );
    for p in PRESETS {
        let c = VitConfig::preset(p)?;
        println!(
            "{p:<28} {:>5} {:>6} {:>6} {:>8} {:>12}",
            c.dim,
            c.depth,
            c.heads,
            c.mlp_dim,
            c.num_params()
        );
    }
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    a.model.apply_threads()?;
    if a.batch_size == 0 || a.epochs == 0 {
        return Err(Error::Config(
            "--batch-size and --epochs must be at least 1".into(),
        ));
    }
    let dir = a.data.clone().unwrap_or_else(default_data_dir);
    let (train, test) = Dataset::cifar_dir(&dir)?;
    let cfg = a.model.config(train.classes.len())?;
    let steps_per_epoch = train.len().div_ceil(a.batch_size) as u64;
    let schedule = LrSchedule::WarmupCosine {
        warmup: a.warmup as u64 * steps_per_epoch,
        total: a.epochs as u64 * steps_per_epoch,
        min_lr: 0.0,
    };
    let tc = TrainConfig {
        lr: a.lr,
        weight_decay: a.weight_decay,
        schedule,
        label_smoothing: a.label_smoothing,
        seed: a.seed,
        ..TrainConfig::default()
    };
    let mut engine = Engine::new(&cfg, tc)?;
    println!(
        "data {} ({} train / {} test images, {} classes); model dim {} depth {} heads {} mlp {} ({} params); {} threads",
        dir.display(),
        train.len(),
        test.len(),
        train.classes.len(),
        cfg.dim,
        cfg.depth,
        cfg.heads,
        cfg.mlp_dim,
        cfg.num_params(),
        cpu::num_threads()
    );
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let metrics_path = a.out.join("metrics.jsonl");
    let mut metrics =
        std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    let mut last_confusion = None;
    let start = Instant::now();
    let train_len = train.len();
    let mut loader = Loader::new(
        Arc::new(train),
        Sampler::new(train_len, true, a.seed),
        a.batch_size,
    )?;
    loader.augment = match a.augment {
        AugmentArg::None => Augment::default(),
        AugmentArg::Crop => Augment {
            crop_padding: 4,
            flip: false,
            auto_augment: false,
        },
        AugmentArg::CropFlip => Augment {
            crop_padding: 4,
            flip: true,
            auto_augment: false,
        },
    };
    for epoch in 0..a.epochs {
        let t0 = Instant::now();
        let mut tot = Totals::default();
        // Drawn on stderr only when it is a terminal (hidden in tests and CI logs).
        let bar = ProgressBar::new(loader.batches_per_epoch() as u64).with_style(bar_style());
        bar.set_prefix(format!("epoch {}/{}", epoch + 1, a.epochs));
        for batch in loader.epoch(epoch as u64) {
            let b = batch?;
            tot.add(engine.train_step(b.images, &b.labels, &b.samples)?);
            let rate = tot.count as f64 / t0.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4} acc {:5.1}% {rate:.0} img/s",
                tot.loss(),
                tot.acc()
            ));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        let (te, confusion) = evaluate(&mut engine, &test, a.batch_size)?;
        last_confusion = Some(confusion);
        println!(
            "epoch {:>3}/{}  train loss {:.4} acc {:5.1}%  test loss {:.4} acc {:5.1}%  lr {:.2e}  {:.0} img/s",
            epoch + 1,
            a.epochs,
            tot.loss(),
            tot.acc(),
            te.loss(),
            te.acc(),
            engine.lr(),
            train_len as f64 / secs
        );
        let line = format!(
            "{{\"epoch\":{},\"train_loss\":{:.6},\"train_acc\":{:.6},\"test_loss\":{:.6},\"test_acc\":{:.6},\"lr\":{:e},\"images_per_s\":{:.1}}}\n",
            epoch + 1,
            tot.loss(),
            tot.acc() / 100.0,
            te.loss(),
            te.acc() / 100.0,
            engine.lr(),
            train_len as f64 / secs
        );
        metrics
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&metrics_path, e))?;
    }
    if let Some(c) = last_confusion {
        println!(
            "final test accuracy {:.2}% ({} images)",
            100.0 * c.accuracy(),
            c.total()
        );
        println!(
            "confusion matrix (classes: {}):\n{c}",
            test.classes.join(", ")
        );
    }
    println!("metrics: {}", metrics_path.display());
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

#[derive(Default)]
struct Totals {
    loss: f64,
    correct: usize,
    count: usize,
}

impl Totals {
    fn add(&mut self, s: BatchStats) {
        self.loss += s.loss as f64 * s.count as f64;
        self.correct += s.correct;
        self.count += s.count;
    }
    fn loss(&self) -> f64 {
        self.loss / self.count.max(1) as f64
    }
    fn acc(&self) -> f64 {
        100.0 * self.correct as f64 / self.count.max(1) as f64
    }
}

fn evaluate(engine: &mut Engine, ds: &Dataset, batch: usize) -> Result<(Totals, ConfusionMatrix)> {
    let mut tot = Totals::default();
    let mut confusion = ConfusionMatrix::new(ds.classes.len());
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(batch) {
        let (images, labels) = ds.batch(chunk, None)?;
        let (stats, predictions) = engine.eval_batch(images, &labels)?;
        tot.add(stats);
        confusion.add(&labels, &predictions);
    }
    Ok((tot, confusion))
}

fn bench(a: BenchArgs) -> Result<()> {
    a.model.apply_threads()?;
    if a.batch_size == 0 || a.steps == 0 {
        return Err(Error::Config(
            "--batch-size and --steps must be at least 1".into(),
        ));
    }
    let cfg = a.model.config(10)?;
    let mut engine = Engine::new(&cfg, TrainConfig::default())?;
    let mut rng = Rng::new(1);
    let b = a.batch_size;
    let images = Tensor::from_vec(rng.vec(b * 3 * 32 * 32, |r| r.normal()), [b, 3, 32, 32])?;
    let labels: Vec<usize> = (0..b).map(|i| i % 10).collect();
    let samples: Vec<u64> = (0..b as u64).collect();
    let mut times = Vec::new();
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        engine.train_step(images.clone(), &labels, &samples)?;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{} params, batch {b}, {} threads: median step {:.3} s, {:.1} images/s",
        cfg.num_params(),
        cpu::num_threads(),
        median,
        b as f64 / median
    );
    Ok(())
}
