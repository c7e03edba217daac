use clap::{Parser, Subcommand};

/// spillway: self-hosted GPU inference on Kubernetes, with burst to managed providers.
#[derive(Parser, Debug)]
#[command(name = "spillway", version, about)]
struct Cli {
    #[command(flatten)]
    log: spillway::telemetry::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator: watch InferenceServices and ScalingPolicies and reconcile them.
    Controller(spillway::controller::ControllerArgs),
    /// Print the CustomResourceDefinitions as YAML, or write one file each (what `crds/` holds).
    Crdgen {
        /// Write `<plural>.yaml` files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Replay a traffic trace against an InferenceService and ScalingPolicy (no cluster needed).
    Simulate(Box<spillway::sim::SimulateArgs>),
    /// Run a simulated inference engine (OpenAI-compatible API, vLLM-style metrics).
    EngineSim(spillway::engine_sim::EngineSimArgs),
    /// Run the per-service router: OpenAI-compatible proxy with spill-over to burst providers.
    Router(spillway::router::RouterArgs),
}

/// The router allocates a few small buffers per request; mimalloc's thread-local heaps make
/// that about a third cheaper in instructions than glibc's malloc (see the README's benchmark).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line with its causes, not a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crdgen { out_dir: None } => {
            print!("{}", spillway::crdgen::render_all()?);
            Ok(())
        }
        Command::Crdgen { out_dir: Some(dir) } => spillway::crdgen::write_dir(&dir),
        Command::Controller(args) => {
            spillway::telemetry::init(&cli.log)?;
            spillway::controller::run(args).await
        }
        Command::Simulate(args) => spillway::sim::run(*args),
        Command::EngineSim(args) => {
            spillway::telemetry::init(&cli.log)?;
            spillway::engine_sim::run(args).await
        }
        Command::Router(args) => {
            spillway::telemetry::init(&cli.log)?;
            spillway::router::run(args).await
        }
    }
}
