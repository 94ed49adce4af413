//! The `ferrovit` command line.

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ferrovit::backend::cpu;
use ferrovit::backend::DeviceSpec;
use ferrovit::checkpoint::{self, Checkpoint, Weights};
use ferrovit::data::cifar10;
use ferrovit::data::{Dataset, Normalize};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::infer::Classifier;
use ferrovit::launch::LaunchOptions;
use ferrovit::nn::PRESETS;
use ferrovit::recipe::{self, Channels, PrecisionChoice, TrainOptions};
use ferrovit::rng::Rng;
use ferrovit::signals::{Again, StopFlag, StopOnSignals};
use ferrovit::text::{self, escape};
use ferrovit::trainer::{init_logging, Stopped, Verbosity};
use ferrovit::{Device, Error, Result, Tensor, VitConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "ferrovit",
    version,
    about = "Train Vision Transformers on CIFAR-10-style data"
)]
struct Cli {
    /// Log warnings and errors only (no progress); wins over RUST_LOG
    #[arg(
        long,
        short,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Global options"
    )]
    quiet: bool,
    /// Log debug lines too; wins over RUST_LOG
    #[arg(long, short, global = true, help_heading = "Global options")]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    fn verbosity(&self) -> Verbosity {
        match (self.quiet, self.verbose) {
            (true, _) => Verbosity::Quiet,
            (_, true) => Verbosity::Verbose,
            _ => Verbosity::Normal,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train a ViT (default: a small ViT on the embedded digits data)
    ///
    /// SIGINT (Ctrl-C) or SIGTERM stops the run after the current step with a checkpoint
    /// there and exits with 130 or 143, printing the command that resumes it; a second
    /// signal exits at once.
    Train(Box<TrainArgs>),
    /// Get a data set (the real CIFAR-10)
    #[command(subcommand)]
    Data(DataCommand),
    /// Inspect, verify, export and import checkpoints
    #[command(subcommand)]
    Ckpt(CkptCommand),
    /// Time training steps of a model on random data (images/s)
    Bench(BenchArgs),
    /// Classify images with a trained checkpoint: top-k classes with probabilities
    Infer(InferArgs),
    /// Evaluate a checkpoint on a data set's test split: accuracy, per-class accuracy,
    /// confusion matrix
    Eval(EvalArgs),
    /// Run N processes of ferrovit as the ranks of one group (TCP), e.g.
    /// `ferrovit launch --nproc 4 -- train --dp 2 --pp 2`
    Launch(LaunchArgs),
    /// List the model presets and their parameter counts
    Presets {
        /// Print JSON: [{"preset", "dim", "depth", "heads", "mlp_dim", "patch_size", "params"}, …]
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script, e.g. `ferrovit completions bash >
    /// ~/.local/share/bash-completion/completions/ferrovit`
    Completions {
        /// The shell to complete in
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

impl Command {
    /// Whether the command prints JSON on stdout (its log lines then go to stderr).
    fn json(&self) -> bool {
        match self {
            Command::Train(a) => a.json,
            Command::Ckpt(
                CkptCommand::Inspect { json, .. }
                | CkptCommand::Verify { json, .. }
                | CkptCommand::List { json, .. },
            ) => *json,
            Command::Bench(a) => a.json,
            Command::Infer(a) => a.json,
            Command::Eval(a) => a.json,
            Command::Presets { json } => *json,
            // the ranks print JSON on the launcher's stdout
            Command::Launch(a) => a.args.iter().any(|x| x == "--json"),
            _ => false,
        }
    }
}

/// `ferrovit train`: the run's options ([`TrainOptions`], which defines the flags), and
/// a config file. Each flag left out keeps the value from `--config` (or the default
/// shown); a config file's keys are the flags' names with `_` for `-`.
#[derive(Args)]
struct TrainArgs {
    /// TOML file with any of these options (keys as the flags, `_` for `-`); flags
    /// given on the command line override it
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the final summary as JSON on stdout (log lines go to stderr): {"final_test_accuracy",
    /// "images", "classes", "per_class", "confusion", "seconds", "out", "metrics", "plot",
    /// "checkpoints"}
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    options: TrainOptions,
}

/// Images are PNG or JPEG of any size: the shorter side is resized to the model's image
/// size (the checkpoint's; bilinear), then the centre is cropped, as for image-folder
/// training data, and normalised with the mean and std the checkpoint records. Weights are used in place from the checkpoint's memory-mapped files (checksums
/// verified); every image is read before anything is printed.
#[derive(Args)]
struct InferArgs {
    /// Checkpoint directory (or a root such as out/checkpoints: its newest checkpoint; or
    /// a pointer file naming one: out/checkpoints/best, …/latest)
    #[arg(long, value_name = "DIR")]
    ckpt: PathBuf,
    /// Classes to show per image
    #[arg(long, value_name = "K", default_value_t = 3)]
    top_k: usize,
    /// Print JSON: [{"image": …, "top": [{"index", "class", "probability"}, …]}, …]
    #[arg(long)]
    json: bool,
    /// Where to compute: cpu, cuda, cuda:N or cuda-emu
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    device: DeviceSpec,
    /// f32, bf16 or auto (bf16 on a CUDA device; on the CPU f32 unless its bf16 products are timed faster)
    #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto)]
    precision: PrecisionChoice,
    /// Which weights: the trained ones (raw) or their moving average (ema: the
    /// checkpoint of a run with --ema-decay)
    #[arg(long, value_enum, default_value_t = Weights::Raw)]
    weights: Weights,
    /// Images to classify
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
}

/// The data directory is read as for `train --data` (CIFAR-10 binary or an image
/// folder) at the checkpoint's image size, normalised with its mean and std; its test
/// split is evaluated. Its class names must be the checkpoint's
/// (in any order: labels follow the names), or be mapped to them with --class-map.
#[derive(Args)]
struct EvalArgs {
    /// Checkpoint directory (or a root such as out/checkpoints: its newest checkpoint; or
    /// a pointer file naming one: out/checkpoints/best, …/latest)
    #[arg(long, value_name = "DIR")]
    ckpt: PathBuf,
    /// Data directory [default: the embedded digits data]
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Images per batch
    #[arg(long, value_name = "B", default_value_t = 256)]
    batch_size: usize,
    /// Rename a data class to one of the checkpoint's classes (repeatable)
    #[arg(long = "class-map", value_name = "DATA=MODEL")]
    class_map: Vec<String>,
    /// Print JSON: {"accuracy", "images", "per_class": {class: accuracy}, "confusion": [[…]]}
    #[arg(long)]
    json: bool,
    /// Where to compute: cpu, cuda, cuda:N or cuda-emu
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    device: DeviceSpec,
    /// f32, bf16 or auto (bf16 on a CUDA device; on the CPU f32 unless its bf16 products are timed faster)
    #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto)]
    precision: PrecisionChoice,
    /// Which weights: the trained ones (raw) or their moving average (ema: the
    /// checkpoint of a run with --ema-decay; its accuracy is the run's ema_test_acc)
    #[arg(long, value_enum, default_value_t = Weights::Raw)]
    weights: Weights,
}

/// Each process gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
/// MASTER_PORT (as torchrun sets them; `ferrovit train` honours them, and SLURM's
/// SLURM_PROCID/SLURM_NTASKS, when launched by other tools), and FERROVIT_SECRET, which
/// every connection between them must prove knowledge of: drawn afresh on one machine;
/// with --nnodes > 1 taken from the environment, the same on every node (e.g. `export
/// FERROVIT_SECRET=$(openssl rand -hex 16)`). Each rank computes on cores / local
/// ranks threads unless `train --threads` says otherwise.
/// When one process fails, the others stop with an error naming it; stragglers are
/// killed after --grace. SIGTERM and SIGINT are passed on to the processes, which stop
/// after their current step and save a checkpoint; those still running after
/// --stop-timeout, or at once on a second signal, are killed (exit code 128 + the
/// signal). On Linux they die with the launcher even when it is killed.
#[derive(Args)]
struct LaunchArgs {
    /// Processes to start on this machine (the world size on one machine)
    #[arg(long, visible_alias = "nproc-per-node", value_name = "N")]
    nproc: usize,
    /// Machines taking part: run `launch` on each, with the same flags and its own
    /// --node-rank; WORLD_SIZE = nnodes × nproc
    #[arg(long, value_name = "N", default_value_t = 1)]
    nnodes: usize,
    /// This machine's index, 0..nnodes: it runs ranks node-rank × nproc onwards (node
    /// 0 hosts rank 0 and its store)
    #[arg(long, value_name = "R", default_value_t = 0)]
    node_rank: usize,
    /// Address of rank 0's rendezvous store (with --nnodes > 1: node 0's address, as
    /// the other nodes reach it)
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port of rank 0's rendezvous store; 0 picks a free one (one machine only)
    #[arg(long, default_value_t = 0)]
    master_port: u16,
    /// Seconds the others may take to stop by themselves after one process failed
    #[arg(long, value_name = "S", default_value_t = 10)]
    grace: u64,
    /// Seconds the processes may take to stop (finish the step, save, exit) after a
    /// SIGTERM or SIGINT passed on to them, before they are killed
    #[arg(long, value_name = "S", default_value_t = ferrovit::launch::DEFAULT_STOP_TIMEOUT.as_secs())]
    stop_timeout: u64,
    /// The ferrovit command each process runs (after `--`)
    #[arg(last = true, required = true, value_name = "COMMAND")]
    args: Vec<String>,
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
    /// Give up on --download when connecting, or any read, takes this long
    /// [default: 30 s to connect, 60 s for each read]
    #[arg(long, value_name = "SECS", requires = "download")]
    timeout: Option<f64>,
}

#[derive(Subcommand)]
enum CkptCommand {
    /// Show a checkpoint's model, layout, training state and tensors
    Inspect {
        /// Checkpoint directory (or a root: its newest; or a pointer file: <root>/best)
        dir: PathBuf,
        /// Print JSON: {"checkpoint", "format", "version", "model" (with "params"),
        /// "optimizer", "layout", "training" (as index.json has them), "tensors": [{"name",
        /// "group", "dtype", "shape", "bytes", "files"}], "shards": {file: bytes}}
        #[arg(long)]
        json: bool,
    },
    /// Check every shard header, bound and checksum; exit code 0 only if all are good
    Verify {
        /// Checkpoint directory (or a root: its newest; or a pointer file: <root>/best)
        dir: PathBuf,
        /// Print JSON: {"ok": true, "checkpoint", "tensors", "bytes", "files",
        /// "index_checksum"}, or {"ok": false, "checkpoint", "error"} (exit code 1)
        #[arg(long)]
        json: bool,
    },
    /// List the committed and uncommitted checkpoints under a root
    List {
        /// Checkpoint root, e.g. out/checkpoints
        root: PathBuf,
        /// Remove the uncommitted directories (interrupted saves)
        #[arg(long)]
        clean: bool,
        /// Print JSON: {"committed": [{"path", "latest"}], "uncommitted": [{"path",
        /// "removed"}]}
        #[arg(long)]
        json: bool,
    },
    /// Write the model weights into one safetensors file: a timm VisionTransformer's state
    /// dict (ferrovit's names and layouts are timm's); prints the timm call whose
    /// load_state_dict(..., strict=True) takes it
    Export {
        /// Checkpoint directory (or a root: its newest; or a pointer file: <root>/best)
        dir: PathBuf,
        /// Output .safetensors file
        #[arg(long, value_name = "FILE")]
        safetensors: PathBuf,
        /// Which weights: the trained ones (raw) or their moving average (ema: the
        /// checkpoint of a run with --ema-decay), written under the model's names
        #[arg(long, value_enum, default_value_t = Weights::Raw)]
        weights: Weights,
    },
    /// Make a weights-only checkpoint from a safetensors file: a timm VisionTransformer's
    /// state dict (class token, learned position embedding, global_pool='token'; its
    /// dim, depth, MLP width, patch size, image size and classes read from the tensor
    /// shapes), or a preset's
    Import {
        /// Input .safetensors file
        file: PathBuf,
        /// Checkpoint root to write into (as step-0000000000)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Model preset the weights are for (its shapes are checked; its heads are used
        /// unless --heads is given)
        #[arg(long)]
        preset: Option<String>,
        /// Attention heads: required unless the shapes match a preset's (shapes never
        /// tell the number of heads)
        #[arg(long, value_name = "H")]
        heads: Option<usize>,
        /// Classes of the classifier head [default: the file's head's]; another number
        /// (or a file without a head) gets a fresh head initialised from --seed
        #[arg(long, value_name = "N")]
        num_classes: Option<usize>,
        /// Seed of a fresh head's initialisation
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Rename tensors: FROM=TO replaces the name prefix FROM by TO (repeatable;
        /// the first matching rule applies)
        #[arg(long = "map", value_name = "FROM=TO")]
        map: Vec<String>,
        /// Leave out the tensors whose names (after --map) start with PREFIX (repeatable)
        #[arg(long = "ignore", value_name = "PREFIX")]
        ignore: Vec<String>,
        /// Per-channel mean of the model's input normalisation, recorded for infer/eval
        /// (timm's ImageNet models: 0.485,0.456,0.406)
        #[arg(long, value_name = "R,G,B", default_value = "0.4914,0.4822,0.4465")]
        mean: Channels,
        /// Per-channel std of the model's input normalisation (timm's ImageNet models:
        /// 0.229,0.224,0.225)
        #[arg(long, value_name = "R,G,B", default_value = "0.2470,0.2435,0.2616")]
        std: Channels,
    },
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
    /// Where to compute: cpu, cuda, cuda:N or cuda-emu
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    device: DeviceSpec,
    /// f32, bf16 or auto (bf16 on a CUDA device; on the CPU f32 unless its bf16 products are timed faster)
    #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto)]
    precision: PrecisionChoice,
    /// Print JSON: {"params", "batch_size", "precision", "device", "threads", "statistic",
    /// "step_s", "images_per_s", "infer_s", "infer_images_per_s", "bf16_gemm" (how a
    /// bf16 CPU run's products ran; null otherwise), "profile": [{"kernel", "ms",
    /// "calls"}] (per step)}
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`ferrovit ckpt inspect … | head`), as Unix tools do.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let matches = Cli::command()
        .try_get_matches()
        .unwrap_or_else(|e| exit_on_usage_error(e));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.verbosity(), cli.command.json());
    let result = match cli.command {
        Command::Train(a) => match train(*a, &matches) {
            // stopped by a signal: 128 + the signal, as if it had ended the process
            Ok(Some(code)) => return ExitCode::from(code.clamp(0, 255) as u8),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        },
        Command::Data(DataCommand::Cifar10(a)) => data_cifar10(a),
        Command::Ckpt(c) => ckpt(c),
        Command::Bench(a) => bench(a),
        Command::Presets { json } => presets(json),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "ferrovit",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Infer(a) => infer(a),
        Command::Eval(a) => eval(a),
        Command::Launch(a) => {
            return match launch(a) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("error: {}", text::error_line(&e.to_string()));
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // names in messages come from files and checkpoints: shown escaped, and cut
            // short where they quote much of one
            let e = text::error_line(&e.to_string());
            // under a launcher every rank reports; say which one this is
            match std::env::var("RANK") {
                Ok(r) if std::env::var("WORLD_SIZE").is_ok_and(|w| w != "1") => {
                    eprintln!("error (rank {r}): {e}")
                }
                _ => eprintln!("error: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// `FROM=TO` arguments of `flag` as pairs.
fn pairs(flag: &str, args: &[String]) -> Result<Vec<(String, String)>> {
    args.iter()
        .map(|m| {
            m.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Config(format!("{flag} `{m}` is not FROM=TO")))
        })
        .collect()
}

/// The checkpoint's model on `device`, computing in `precision`.
fn load_on(
    ckpt: PathBuf,
    device: DeviceSpec,
    precision: PrecisionChoice,
    weights: Weights,
) -> Result<Classifier> {
    let device = Device::open(device)?;
    let precision = precision.resolve(device);
    let mut model = Classifier::load_weights(&ckpt_dir(ckpt)?, weights)?;
    model.to_device(device, precision)?;
    Ok(model)
}

fn infer(a: InferArgs) -> Result<()> {
    if a.top_k == 0 {
        return Err(Error::Config("--top-k must be at least 1".into()));
    }
    let mut model = load_on(a.ckpt, a.device, a.precision, a.weights)?;
    // every image is read before anything is printed
    let images = model.load_images(&a.images)?;
    let top = model.top_k(images, a.top_k)?;
    if a.json {
        let out: Vec<serde_json::Value> = a
            .images
            .iter()
            .zip(&top)
            .map(|(p, t)| serde_json::json!({ "image": p, "top": t }))
            .collect();
        println!("{}", serde_json::Value::Array(out));
        return Ok(());
    }
    for (p, t) in a.images.iter().zip(&top) {
        let classes: Vec<String> = t
            .iter()
            .map(|s| format!("{} {:.4}", escape(&s.class), s.probability))
            .collect();
        println!("{}: {}", text::path(p), classes.join(", "));
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    if a.batch_size == 0 {
        return Err(Error::Config("--batch-size must be at least 1".into()));
    }
    let mut model = load_on(a.ckpt, a.device, a.precision, a.weights)?;
    let data = a.data.unwrap_or_else(ferrovit::data::default_data_dir);
    // image folders decoded at the model's size; CIFAR-10 binary data resized to it
    let (_, test) = Dataset::open_at(&data, model.image_size())?;
    let mut test = model.prepare(test);
    model.align_classes(&mut test, &pairs("--class-map", &a.class_map)?)?;
    let names = test.classes.clone();
    let c = model.evaluate(test, a.batch_size)?;
    if a.json {
        println!("{}", serde_json::Value::Object(confusion_json(&names, &c)));
        return Ok(());
    }
    println!(
        "accuracy {:.2}% ({} images, {})",
        100.0 * c.accuracy(),
        c.total(),
        text::path(&data)
    );
    println!(
        "confusion matrix (rows: true class, columns: predicted; classes: {}):\n{c}",
        text::join(&names)
    );
    Ok(())
}

/// A confusion matrix as JSON: {"accuracy", "images", "per_class": {class: accuracy},
/// "confusion": [[count of (true row, predicted column)]]}.
fn confusion_json(
    names: &[String],
    c: &ferrovit::metrics::ConfusionMatrix,
) -> serde_json::Map<String, serde_json::Value> {
    let per: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(c.per_class_accuracy())
        .map(|(n, acc)| (n.clone(), serde_json::json!(acc)))
        .collect();
    let k = names.len();
    let confusion: Vec<Vec<u64>> = (0..k)
        .map(|y| (0..k).map(|p| c.count(y, p)).collect())
        .collect();
    let mut out = serde_json::Map::new();
    out.insert("accuracy".into(), c.accuracy().into());
    out.insert("images".into(), c.total().into());
    out.insert("per_class".into(), per.into());
    out.insert("confusion".into(), serde_json::json!(confusion));
    out
}

fn launch(a: LaunchArgs) -> Result<i32> {
    ferrovit::launch::launch(&LaunchOptions {
        nproc: a.nproc,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        args: a.args,
        program: None,
        grace: Duration::from_secs(a.grace),
        stop_timeout: Duration::from_secs(a.stop_timeout),
    })
}

fn presets(json: bool) -> Result<()> {
    if json {
        let rows = PRESETS
            .iter()
            .map(|&p| {
                let c = VitConfig::preset(p)?;
                Ok(serde_json::json!({
                    "preset": p,
                    "dim": c.dim,
                    "depth": c.depth,
                    "heads": c.heads,
                    "mlp_dim": c.mlp_dim,
                    "patch_size": c.patch_size,
                    "params": c.num_params(),
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
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

/// `ferrovit train`; the exit code of a run stopped by a signal.
fn train(a: TrainArgs, matches: &ArgMatches) -> Result<Option<i32>> {
    let (base, mut given) = match &a.config {
        Some(path) => TrainOptions::from_toml_file_keys(path)?,
        None => (TrainOptions::default(), Vec::new()),
    };
    let flags = given_flags(matches, "train");
    let opts = TrainOptions::merged(&base, &a.options, &flags)?;
    // a resume takes the options given neither way from its checkpoint
    given.extend(flags);
    let stop = StopFlag::new();
    let _signals = stop_on_signals(&stop)?;
    let summary = recipe::train_given_until(&opts, &given, &stop)?;
    let code = summary.stopped.as_ref().map(|t| t.reason.exit_code());
    if summary.rank != 0 {
        return Ok(code); // rank 0 reports for the run
    }
    if let Some(reason) = stop.reason().filter(|_| code.is_none()) {
        tracing::info!("{reason} came after the last training step: the run finished");
    }
    if a.json {
        println!("{}", train_json(&summary, &opts));
    }
    if let Some(t) = &summary.stopped {
        match a.json {
            true => eprintln!("{}", stopped_line(t, &opts)),
            false => println!("{}", stopped_line(t, &opts)),
        }
        return Ok(code);
    }
    if a.json {
        return Ok(None);
    }
    if let (Some(acc), Some(c)) = (summary.final_test_accuracy, &summary.confusion) {
        println!(
            "final test accuracy {:.2}% ({} images)",
            100.0 * acc,
            c.total()
        );
        println!(
            "confusion matrix (rows: true class, columns: predicted; classes: {}):\n{c}",
            text::join(&summary.classes)
        );
    }
    if let Some((loss, acc)) = summary.final_ema_test {
        println!(
            "final test accuracy of the EMA weights {:.2}% (test loss {loss:.4})",
            100.0 * acc
        );
    }
    println!(
        "metrics: {}  plot: {}",
        text::path(&summary.metrics_path),
        text::path(&summary.plot_path)
    );
    println!("done in {:.1} s", summary.seconds);
    Ok(None)
}

/// SIGINT and SIGTERM stop training after the current step. A process of its own exits
/// at once on a second signal; a rank of a launched group leaves that to its launcher,
/// which may pass on a signal the rank already had (a terminal's Ctrl-C and Slurm
/// signal every process), and only its rank 0 says it is stopping.
fn stop_on_signals(stop: &StopFlag) -> Result<StopOnSignals> {
    let env = ferrovit::dist::DistEnv::from_env().ok().flatten();
    let (again, announce) = match env {
        Some(e) if e.world > 1 => (Again::Ignore, e.rank == 0),
        _ => (Again::Exit, true),
    };
    StopOnSignals::install(stop.clone(), again, announce)
        .map_err(|e| Error::Message(format!("cannot handle SIGINT/SIGTERM: {e}")))
}

/// Where a stopped run stopped, its checkpoint and how to continue.
fn stopped_line(t: &Stopped, opts: &TrainOptions) -> String {
    let at = format!(
        "stopped by {} after step {} (epoch {}, batch {})",
        t.reason,
        t.step,
        t.epoch + 1,
        t.batch
    );
    let train = format!("train --out {} --resume auto", text::path(&opts.out));
    let resume = match ferrovit::dist::DistEnv::from_env().ok().flatten() {
        Some(e) if e.world > 1 && std::env::var_os("FERROVIT_LAUNCHED").is_some() => {
            let nproc = e.local_world.unwrap_or(e.world);
            let nodes = match nproc == e.world {
                true => String::new(),
                false => " on each node".into(),
            };
            format!("`ferrovit launch --nproc {nproc} -- {train}`{nodes}")
        }
        Some(e) if e.world > 1 => format!("`ferrovit {train}` on {} ranks", e.world),
        _ => format!("`ferrovit {train}`"),
    };
    match &t.checkpoint {
        Some(dir) => format!("{at}: checkpoint {}; resume with {resume}", text::path(dir)),
        None => format!(
            "{at}: nothing was saved (--no-save); {resume} continues from an earlier checkpoint, if there is one"
        ),
    }
}

/// `train --json`'s summary: the final test's [`confusion_json`] (accuracy renamed
/// `final_test_accuracy`; null without a test), the classes, the seconds and the paths
/// written (`checkpoints` null with `--no-save`), and where a stopped run stopped
/// (`stopped`: reason, exit code, epoch, batch, step, checkpoint; null otherwise).
fn train_json(summary: &recipe::TrainSummary, opts: &TrainOptions) -> serde_json::Value {
    let mut out = match &summary.confusion {
        Some(c) => confusion_json(&summary.classes, c),
        None => serde_json::Map::new(),
    };
    let accuracy = out.remove("accuracy").unwrap_or_default();
    out.insert("final_test_accuracy".into(), accuracy);
    let ema = summary.final_ema_test;
    out.insert("final_ema_test_loss".into(), ema.map(|e| e.0).into());
    out.insert("final_ema_test_accuracy".into(), ema.map(|e| e.1).into());
    let path = |p: &std::path::Path| serde_json::Value::from(p.to_string_lossy());
    let checkpoints = match opts.no_save {
        true => serde_json::Value::Null,
        false => path(&opts.checkpoint_root()),
    };
    out.insert("classes".into(), serde_json::json!(summary.classes));
    out.insert("seconds".into(), summary.seconds.into());
    out.insert("out".into(), path(&opts.out));
    out.insert("metrics".into(), path(&summary.metrics_path));
    out.insert("plot".into(), path(&summary.plot_path));
    out.insert("checkpoints".into(), checkpoints);
    let stopped = summary.stopped.as_ref().map(|t| {
        serde_json::json!({
            "reason": t.reason.to_string(),
            "exit_code": t.reason.exit_code(),
            "epoch": t.epoch,
            "batch": t.batch,
            "step": t.step,
            "checkpoint": t.checkpoint.as_deref().map(|p| p.to_string_lossy()),
        })
    });
    out.insert("stopped".into(), stopped.into());
    serde_json::Value::Object(out)
}

/// Exits on a command line clap refused. A value a flag cannot take is one line, as
/// every other error is; the rest (help, version, unknown flags with their hints) as
/// clap writes it.
fn exit_on_usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        let text = e.to_string();
        let parts: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
            .collect();
        eprintln!("{}", parts.join(" "));
        std::process::exit(2);
    }
    e.exit()
}

/// The options of subcommand `sub` set on the command line (not defaults).
fn given_flags(matches: &ArgMatches, sub: &str) -> Vec<String> {
    let Some(m) = matches.subcommand_matches(sub) else {
        return Vec::new();
    };
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
}

fn data_cifar10(a: Cifar10Args) -> Result<()> {
    let (dir, train, test) = match (&a.download, &a.archive) {
        (Some(dir), _) => {
            println!("downloading {} into {}", a.url, dir.display());
            let timeouts = match a.timeout {
                Some(secs) => cifar10::Timeouts::both(secs)?,
                None => cifar10::Timeouts::default(),
            };
            let (archive, train, test) = cifar10::download(&a.url, dir, timeouts)?;
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

/// A checkpoint directory, the one a pointer file names (`<root>/best`,
/// `<root>/latest`), or the newest under a root.
fn ckpt_dir(dir: PathBuf) -> Result<PathBuf> {
    if let (true, Some(root), Some(pointer)) = (
        dir.is_file(),
        dir.parent(),
        dir.file_name().and_then(|n| n.to_str()),
    ) {
        return match checkpoint::read_pointer(root, pointer) {
            Some(name) => Ok(root.join(name)),
            None => Err(Error::Format {
                path: dir.clone(),
                msg: "not a checkpoint directory, nor a pointer file naming one".into(),
            }),
        };
    }
    if !dir.join(checkpoint::INDEX).exists() {
        if let Some(newest) = checkpoint::newest(&dir)? {
            return Ok(newest);
        }
    }
    Ok(dir)
}

fn ckpt(c: CkptCommand) -> Result<()> {
    match c {
        CkptCommand::Inspect { dir, json } => ckpt_inspect(dir, json),
        CkptCommand::Verify { dir, json } => ckpt_verify(dir, json),
        CkptCommand::List { root, clean, json } => ckpt_list(&root, clean, json),
        CkptCommand::Export {
            dir,
            safetensors,
            weights,
        } => {
            let dir = ckpt_dir(dir)?;
            let n = checkpoint::export_weights(&dir, &safetensors, weights)?;
            println!("wrote {n} model tensors to {}", text::path(&safetensors));
            let model = checkpoint::read_index(&dir)?.model;
            match checkpoint::timm_constructor(&model) {
                Some(call) => println!("timm: {call}.load_state_dict(..., strict=True)"),
                None => println!(
                    "timm: no VisionTransformer mlp_ratio gives the MLP width {} of dim {}",
                    model.mlp_dim, model.dim
                ),
            }
            Ok(())
        }
        CkptCommand::Import {
            file,
            out,
            preset,
            heads,
            num_classes,
            seed,
            map,
            ignore,
            mean,
            std,
        } => {
            let norm = Normalize {
                mean: mean.0,
                std: std.0,
            };
            if let Err(why) = norm.check() {
                return Err(Error::Config(format!("--mean {mean} / --std {std}: {why}")));
            }
            let opts = checkpoint::ImportOptions {
                preset,
                heads,
                num_classes,
                map: pairs("--map", &map)?,
                ignore,
                norm,
                seed,
            };
            let done = checkpoint::import_safetensors(&file, &out, &opts)?;
            let m = &done.model;
            let mut notes = Vec::new();
            if let Some(p) = &done.heads_from {
                notes.push(format!("{} heads from preset {p}", m.heads));
            }
            if done.fresh_head {
                notes.push(format!(
                    "a fresh {}-class head (seed {seed})",
                    m.num_classes
                ));
            }
            if done.ignored > 0 {
                notes.push(format!("{} tensors left out", done.ignored));
            }
            println!(
                "imported {} tensors into {}: dim {} depth {} heads {} mlp_dim {} patch {} image {} classes {}{}",
                done.tensors,
                text::path(&done.dest),
                m.dim, m.depth, m.heads, m.mlp_dim, m.patch_size, m.image_size, m.num_classes,
                notes.iter().map(|n| format!("; {n}")).collect::<String>()
            );
            Ok(())
        }
    }
}

/// `ckpt inspect`: the index's model, optimizer, layout and training state, then a
/// table of its tensors and the bytes in each shard file.
fn ckpt_inspect(dir: PathBuf, json: bool) -> Result<()> {
    let dir = ckpt_dir(dir)?;
    let ck = Checkpoint::open(&dir)?;
    let ix = &ck.index;
    if json {
        println!("{}", inspect_json(&dir, ix)?);
        return Ok(());
    }
    let m = &ix.model;
    println!("checkpoint {}", text::path(&dir));
    println!("format {} version {}", escape(&ix.format), ix.version);
    println!(
        "model: dim {} depth {} heads {} mlp {} patch {} image {} classes {} dropout {} drop-path {} ({} params)",
        m.dim,
        m.depth,
        m.heads,
        m.mlp_dim,
        m.patch_size,
        m.image_size,
        m.num_classes,
        m.dropout,
        m.drop_path,
        m.num_params()
    );
    println!("optimizer: {:?}", ix.optimizer);
    println!(
        "layout: world {} (dp {} × pp {})",
        ix.layout.world, ix.layout.dp, ix.layout.pp
    );
    let t = &ix.training;
    println!(
        "training: {} epochs + {} batches done, step {}, lr {:e} (base {:e}), seed {}, schedule {:?}, {} epochs of history",
        t.epoch, t.batch, t.step, t.lr, t.base_lr, t.seed, t.schedule, t.history.len()
    );
    if !t.classes.is_empty() {
        println!("classes: {}", text::join(&t.classes));
    }
    print_tensors(ix);
    Ok(())
}

/// Bytes of a tensor entry (all its chunks).
fn entry_bytes(e: &checkpoint::TensorEntry) -> u64 {
    e.chunks.iter().map(|c| c.end - c.start).sum()
}

/// Bytes of tensors in each shard file.
fn shard_bytes(ix: &checkpoint::Index) -> std::collections::BTreeMap<&str, u64> {
    let mut files: std::collections::BTreeMap<&str, u64> = Default::default();
    for c in ix.tensors.values().flat_map(|e| &e.chunks) {
        *files.entry(&c.file).or_default() += c.end - c.start;
    }
    files
}

/// `ckpt inspect --json`: the index's model (with its parameter count), optimizer,
/// layout and training state as index.json writes them, then the tensors and shards.
fn inspect_json(dir: &std::path::Path, ix: &checkpoint::Index) -> Result<serde_json::Value> {
    // through the text index.json is written as, so that f32s keep their shortest
    // form (0.1, not 0.10000000149011612)
    let file: serde_json::Value = serde_json::to_string(ix)
        .and_then(|t| serde_json::from_str(&t))
        .map_err(|e| Error::Message(format!("index: {e}")))?;
    let mut model = file["model"].clone();
    model["params"] = ix.model.num_params().into();
    let tensors: Vec<serde_json::Value> = ix
        .tensors
        .iter()
        .map(|(name, e)| {
            let files: Vec<&str> = e.chunks.iter().map(|c| c.file.as_str()).collect();
            serde_json::json!({
                "name": name,
                "group": file["tensors"][name]["group"],
                "dtype": e.dtype.name(),
                "shape": e.shape,
                "bytes": entry_bytes(e),
                "files": files,
            })
        })
        .collect();
    Ok(serde_json::json!({
        "checkpoint": dir.to_string_lossy(),
        "format": ix.format,
        "version": ix.version,
        "model": model,
        "optimizer": file["optimizer"],
        "layout": file["layout"],
        "training": file["training"],
        "tensors": tensors,
        "shards": shard_bytes(ix),
    }))
}

/// The tensor table of `ckpt inspect`, then each shard file's bytes of tensors.
fn print_tensors(ix: &checkpoint::Index) {
    println!(
        "{:<44} {:<9} {:<6} {:>16} {:>12}  file",
        "tensor", "group", "dtype", "shape", "bytes"
    );
    for (name, e) in &ix.tensors {
        let bytes = entry_bytes(e);
        println!(
            "{:<44} {:<9} {:<6} {:>16} {bytes:>12}  {}",
            escape(name),
            format!("{:?}", e.group).to_lowercase(),
            e.dtype.name(),
            format!("{:?}", e.shape),
            escape(
                &e.chunks
                    .iter()
                    .map(|c| c.file.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        );
    }
    for (f, b) in shard_bytes(ix) {
        println!("shard {}: {b} bytes of tensors", escape(f));
    }
}

/// `ckpt verify`: every header, bound and checksum; an error (a failing exit) if any
/// is bad.
fn ckpt_verify(dir: PathBuf, json: bool) -> Result<()> {
    let dir = ckpt_dir(dir)?;
    let verified = Checkpoint::open(&dir).and_then(|ck| Ok((ck.verify()?, ck.index.version)));
    if json {
        let out = match &verified {
            Ok((r, version)) => serde_json::json!({
                "ok": true,
                "checkpoint": dir.to_string_lossy(),
                "tensors": r.tensors,
                "bytes": r.bytes,
                "files": r.files,
                "index_checksum": *version >= 2,
            }),
            Err(e) => serde_json::json!({
                "ok": false,
                "checkpoint": dir.to_string_lossy(),
                "error": e.to_string(),
            }),
        };
        println!("{out}");
    }
    let (r, version) = verified?;
    if json {
        return Ok(());
    }
    let index = match version {
        1 => "index validated (version 1: it has no checksum)",
        _ => "index checksum and contents verified",
    };
    println!(
        "ok: {} tensors, {} bytes in {} shard files: {index}, every header, bound and checksum verified ({})",
        r.tensors, r.bytes, r.files, text::path(&dir)
    );
    Ok(())
}

/// `ckpt list`: committed checkpoints (the `latest` and `best` ones marked), then
/// uncommitted directories, removed with `clean`; as JSON with `json`.
fn ckpt_list(root: &std::path::Path, clean: bool, json: bool) -> Result<()> {
    if !root.is_dir() {
        return Err(Error::Config(format!(
            "{} is not a directory of checkpoints",
            text::path(root)
        )));
    }
    let l = checkpoint::list(root)?;
    let run_dir = root.join("checkpoints");
    if l.committed.is_empty() && l.uncommitted.is_empty() && run_dir.is_dir() {
        tracing::warn!(
            "no checkpoints directly in {}: a run keeps them in {}",
            text::path(root),
            text::path(&run_dir)
        );
    }
    let named = |pointer: &str| {
        let name = checkpoint::read_pointer(root, pointer);
        move |p: &std::path::Path| {
            name.is_some() && p.file_name().and_then(|n| n.to_str()) == name.as_deref()
        }
    };
    let (is_latest, is_best) = (named("latest"), named(checkpoint::BEST));
    if clean {
        for p in &l.uncommitted {
            std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
    }
    if json {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        let out = serde_json::json!({
            "committed": l.committed.iter()
                .map(|p| serde_json::json!({"path": path(p), "latest": is_latest(p), "best": is_best(p)}))
                .collect::<Vec<_>>(),
            "uncommitted": l.uncommitted.iter()
                .map(|p| serde_json::json!({"path": path(p), "removed": clean}))
                .collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(());
    }
    for p in &l.committed {
        let marks: Vec<&str> = [(is_latest(p), "latest"), (is_best(p), "best")]
            .into_iter()
            .filter_map(|(on, m)| on.then_some(m))
            .collect();
        let mark = match marks.is_empty() {
            true => String::new(),
            false => format!("  ({})", marks.join(", ")),
        };
        println!("committed    {}{mark}", text::path(p));
    }
    for p in &l.uncommitted {
        if clean {
            println!("removed      {} (uncommitted)", text::path(p));
        } else {
            println!(
                "uncommitted  {} (an interrupted save; never loaded)",
                text::path(p)
            );
        }
    }
    Ok(())
}

/// What `bench` measured.
struct BenchResult {
    params: usize,
    batch: usize,
    precision: ferrovit::Precision,
    device: Device,
    /// How `step` was taken from the timed steps: "median" or "mean".
    statistic: &'static str,
    /// Seconds per step.
    step: f64,
    /// Seconds per inference batch (forward only, evaluation mode), by `statistic`.
    infer: f64,
    /// Steps run, warm-up included (the profile's divisor).
    steps_run: f64,
    /// The CUDA profile's (kernel, calls, ms) over the training steps (FERROVIT_PROFILE=1).
    profile: Vec<(String, u64, f64)>,
}

fn bench(a: BenchArgs) -> Result<()> {
    let r = bench_run(&a)?;
    if a.json {
        println!("{}", bench_json(&r));
        return Ok(());
    }
    let on = match r.device {
        Device::Cpu => format!("{} threads", cpu::num_threads()),
        d => d.describe(),
    };
    println!(
        "{} params, batch {}, {}, {on}: {} step {:.3} s, {:.1} images/s",
        r.params,
        r.batch,
        r.precision,
        r.statistic,
        r.step,
        r.batch as f64 / r.step
    );
    println!(
        "inference: {} batch {:.3} s, {:.1} images/s",
        r.statistic,
        r.infer,
        r.batch as f64 / r.infer
    );
    if let Some(choice) = bf16_choice(&r) {
        println!("{choice}");
    }
    print_profile(r.device, &r.profile, r.steps_run);
    Ok(())
}

/// Times `a.steps` training steps after `a.warmup` untimed ones.
fn bench_run(a: &BenchArgs) -> Result<BenchResult> {
    check_bench_args(a)?;
    if let Some(n) = a.threads {
        cpu::set_num_threads(n)?;
    }
    let cfg = VitConfig::preset(&a.preset)?;
    let device = Device::open(a.device)?;
    let precision = a.precision.resolve(device);
    let config = TrainConfig {
        precision,
        ..TrainConfig::default()
    };
    let mut engine = Engine::new(&cfg, config)?;
    engine.to_device(device)?;
    let mut rng = Rng::new(1);
    let b = a.batch_size;
    // On the device once, as a data loader's prefetch would leave it (PyTorch's side of
    // the comparison, scripts/bench_torch.py, does the same).
    let images = Tensor::from_vec(rng.vec(b * 3 * 32 * 32, |r| r.normal()), [b, 3, 32, 32])?
        .to_device(device)?;
    let labels: Vec<usize> = (0..b).map(|i| i % 10).collect();
    let samples: Vec<u64> = (0..b as u64).collect();
    for _ in 0..a.warmup {
        engine.train_step(images.clone(), &labels, &samples)?;
    }
    // A step returns while a GPU still runs its backward pass (the next one is queued
    // meanwhile), so on a GPU the timed steps are taken together between two waits for
    // the device; on the CPU each step is timed and the median kept (robust to noise).
    device.synchronize()?;
    let start = Instant::now();
    let mut times = Vec::new();
    for _ in 0..a.steps {
        let t0 = Instant::now();
        engine.train_step(images.clone(), &labels, &samples)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let (statistic, step) = timing(device, times, start)?;
    // the training steps' kernels only
    let profile = profile_rows(device);
    let infer = time_inference(&mut engine, &images, &labels, a)?;
    Ok(BenchResult {
        params: cfg.num_params(),
        batch: b,
        precision,
        device,
        statistic,
        step,
        infer,
        steps_run: (a.warmup + a.steps) as f64,
        profile,
    })
}

/// The statistic of per-step `times` taken since `start`: on the CPU the median, on a
/// GPU (whose steps overlap) the mean over the whole run, after waiting for it.
fn timing(device: Device, mut times: Vec<f64>, start: Instant) -> Result<(&'static str, f64)> {
    device.synchronize()?;
    times.sort_by(f64::total_cmp);
    Ok(match device {
        Device::Cpu => ("median", times[times.len() / 2]),
        _ => ("mean", start.elapsed().as_secs_f64() / times.len() as f64),
    })
}

/// Seconds per inference batch (forward pass in evaluation mode, predictions read),
/// after `a.warmup` untimed ones: the same statistic as the training step's.
fn time_inference(
    engine: &mut Engine,
    images: &Tensor,
    labels: &[usize],
    a: &BenchArgs,
) -> Result<f64> {
    for _ in 0..a.warmup {
        engine.eval_batch(images.clone(), labels)?;
    }
    let device = engine.params_device();
    device.synchronize()?;
    let start = Instant::now();
    let mut times = Vec::new();
    for _ in 0..a.steps {
        let t0 = Instant::now();
        engine.eval_batch(images.clone(), labels)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(timing(device, times, start)?.1)
}

/// How bf16 products run on the CPU, for a bf16 CPU run.
fn bf16_choice(r: &BenchResult) -> Option<cpu::bf16gemm::Bf16Choice> {
    (r.device == Device::Cpu && r.precision == ferrovit::Precision::Bf16)
        .then(cpu::bf16gemm::choice)
}

/// `bench --json`: the result, and the CUDA profile's rows per step.
fn bench_json(r: &BenchResult) -> serde_json::Value {
    let per_step = |x: f64| x / r.steps_run;
    let profile: Vec<serde_json::Value> = r
        .profile
        .iter()
        .map(|(kernel, calls, ms)| {
            serde_json::json!({"kernel": kernel, "ms": per_step(*ms), "calls": per_step(*calls as f64)})
        })
        .collect();
    serde_json::json!({
        "params": r.params,
        "batch_size": r.batch,
        "precision": r.precision.to_string(),
        "device": r.device.describe(),
        "threads": cpu::num_threads(),
        "statistic": r.statistic,
        "step_s": r.step,
        "images_per_s": r.batch as f64 / r.step,
        "infer_s": r.infer,
        "infer_images_per_s": r.batch as f64 / r.infer,
        "bf16_gemm": bf16_choice(r).map(|c| c.to_string()),
        "profile": profile,
    })
}

/// Refuses bench sizes out of bounds, so the random batch's size and the step count
/// cannot overflow.
fn check_bench_args(a: &BenchArgs) -> Result<()> {
    for (flag, n, max) in [
        ("--batch-size", a.batch_size, 1 << 16),
        ("--steps", a.steps, 1 << 20),
        ("--warmup", a.warmup, 1 << 20),
    ] {
        let least = (flag != "--warmup") as usize;
        if !(least..=max).contains(&n) {
            return Err(Error::Config(format!(
                "{flag} {n}: must be in {least}..={max}"
            )));
        }
    }
    Ok(())
}

/// The per-kernel (name, calls, ms) of a CUDA device under FERROVIT_PROFILE=1, over
/// the whole run; none elsewhere.
fn profile_rows(device: Device) -> Vec<(String, u64, f64)> {
    match device {
        Device::Cuda(_) => ferrovit::backend::cuda::profile(device).unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The per-kernel times of a CUDA device (FERROVIT_PROFILE=1), per step of `steps`.
fn print_profile(device: Device, rows: &[(String, u64, f64)], steps: f64) {
    if rows.is_empty() {
        return;
    }
    let total: f64 = rows.iter().map(|r| r.2).sum();
    let what = if device.is_gpu() {
        "device time"
    } else {
        "emulated kernels' host time"
    };
    println!(
        "{what} per step (FERROVIT_PROFILE=1): {:.3} ms",
        total / steps
    );
    for (what, calls, ms) in rows {
        println!(
            "{:>9.3} ms {:>5.1}% {:>6} calls  {what}",
            ms / steps,
            100.0 * ms / total,
            *calls as f64 / steps
        );
    }
}
