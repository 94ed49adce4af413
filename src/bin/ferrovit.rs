//! The `ferrovit` command line.

use clap::{Args, Parser, Subcommand};
use ferrovit::backend::cpu;
use ferrovit::data::cifar10;
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::nn::PRESETS;
use ferrovit::recipe::{self, TrainOptions};
use ferrovit::rng::Rng;
use ferrovit::trainer::init_stdout;
use ferrovit::{Error, Result, Tensor, VitConfig};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
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
    Train(Box<TrainArgs>),
    /// Get a data set (the real CIFAR-10)
    #[command(subcommand)]
    Data(DataCommand),
    /// Time training steps of a model on random data (images/s)
    Bench(BenchArgs),
    /// List the model presets and their parameter counts
    Presets,
}

/// Flags of `ferrovit train`. Each one left out keeps the value from `--config` (or
/// the default shown); field names are the config file's keys.
#[derive(Args, Serialize)]
struct TrainArgs {
    /// TOML file with any of these options (keys as the flags, `_` for `-`); flags
    /// given on the command line override it
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Model preset (see `ferrovit presets`); --dim/--depth/--heads/--mlp-dim/--patch-size override its values
    #[arg(long)]
    preset: Option<String>,
    /// Embedding width [default: 128 without a preset]
    #[arg(long)]
    dim: Option<usize>,
    /// Transformer blocks [default: 4 without a preset]
    #[arg(long)]
    depth: Option<usize>,
    /// Attention heads, must divide --dim [default: 4 without a preset]
    #[arg(long)]
    heads: Option<usize>,
    /// MLP hidden width [default: 256 without a preset]
    #[arg(long)]
    mlp_dim: Option<usize>,
    /// Patch side in pixels, must divide 32 [default: 4]
    #[arg(long)]
    patch_size: Option<usize>,
    /// Dropout probability [default: 0.1]
    #[arg(long)]
    dropout: Option<f32>,
    /// Data directory: CIFAR-10 binary files or an image folder (train/<class>/*.png,
    /// test/<class>/…) [default: the embedded digits data]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Passes over the training set [default: 20]
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per step [default: 64]
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate of AdamW [default: 0.002]
    #[arg(long)]
    lr: Option<f32>,
    /// Linear warm-up in epochs (fractions allowed), then cosine decay to 0 [default: 1]
    #[arg(long)]
    warmup: Option<f32>,
    /// AdamW decoupled weight decay [default: 0.05]
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Label smoothing of the training loss, in [0, 1] [default: 0]
    #[arg(long)]
    label_smoothing: Option<f32>,
    /// Training augmentation, a comma-separated list of: crop (random crop of the image
    /// zero-padded by 4), flip (random horizontal flip), autoaugment (the CIFAR-10
    /// AutoAugment policy); or none. Digits are not mirror-symmetric, hence no flip by
    /// default [default: none]
    #[arg(long)]
    augment: Option<String>,
    /// Seed of initialisation, data order, augmentation and dropout [default: 0]
    #[arg(long)]
    seed: Option<u64>,
    /// CPU compute threads [default: one per core]
    #[arg(long)]
    threads: Option<usize>,
    /// Data-loader worker threads [default: 2]
    #[arg(long)]
    workers: Option<usize>,
    /// Test every N epochs and after the last [default: 1]
    #[arg(long)]
    test_interval: Option<usize>,
    /// Output directory: metrics.jsonl (per-epoch metrics), metrics.png (curves),
    /// config.toml (the resolved options) [default: out]
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download (or extract an already-downloaded archive of) CIFAR-10, binary version
    #[command(group = clap::ArgGroup::new("source").required(true))]
    Cifar10(Cifar10Args),
}

#[derive(Args)]
struct Cifar10Args {
    /// Download the archive into DIR and extract it there
    #[arg(long, value_name = "DIR", group = "source")]
    download: Option<PathBuf>,
    /// Extract this cifar-10-binary.tar.gz (already downloaded) into --dir
    #[arg(long, value_name = "FILE", group = "source")]
    archive: Option<PathBuf>,
    /// Where --archive extracts to
    #[arg(long, value_name = "DIR", default_value = "data/cifar10")]
    dir: PathBuf,
    /// Where --download fetches from
    #[arg(long, default_value = cifar10::URL)]
    url: String,
}

#[derive(Args)]
struct BenchArgs {
    /// Model preset (see `ferrovit presets`)
    #[arg(long, default_value = "vit_lite_depth7_patch4_32")]
    preset: String,
    /// Images per step
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed steps
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// CPU threads [default: one per core]
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_stdout();
    let result = match cli.command {
        Command::Train(a) => train(*a),
        Command::Data(DataCommand::Cifar10(a)) => data_cifar10(a),
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
    let base = match &a.config {
        Some(path) => TrainOptions::from_toml_file(path)?,
        None => TrainOptions::default(),
    };
    let opts = TrainOptions::merged(&base, &a)?;
    let summary = recipe::train(&opts)?;
    if let (Some(acc), Some(c)) = (summary.final_test_accuracy, &summary.confusion) {
        println!(
            "final test accuracy {:.2}% ({} images)",
            100.0 * acc,
            c.total()
        );
        println!(
            "confusion matrix (rows: true class, columns: predicted; classes: {}):\n{c}",
            summary.classes.join(", ")
        );
    }
    println!(
        "metrics: {}  plot: {}",
        summary.metrics_path.display(),
        summary.plot_path.display()
    );
    println!("done in {:.1} s", summary.seconds);
    Ok(())
}

fn data_cifar10(a: Cifar10Args) -> Result<()> {
    let (dir, train, test) = match (&a.download, &a.archive) {
        (Some(dir), _) => {
            println!("downloading {} into {}", a.url, dir.display());
            let (archive, train, test) = cifar10::download(&a.url, dir)?;
            println!("downloaded {}", archive.display());
            (dir.clone(), train, test)
        }
        (None, Some(archive)) => {
            let (train, test) = cifar10::extract(archive, &a.dir)?;
            (a.dir.clone(), train, test)
        }
        (None, None) => {
            return Err(Error::Config(
                "give --download DIR or --archive FILE".into(),
            ))
        }
    };
    println!(
        "CIFAR-10 ready in {}: {train} train / {test} test images\ntrain with: ferrovit train --data {} --preset vit_lite_depth7_patch4_32 --augment crop,flip,autoaugment",
        dir.display(),
        dir.display()
    );
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if let Some(n) = a.threads {
        cpu::set_num_threads(n)?;
    }
    if a.batch_size == 0 || a.steps == 0 {
        return Err(Error::Config(
            "--batch-size and --steps must be at least 1".into(),
        ));
    }
    let cfg = VitConfig::preset(&a.preset)?;
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
