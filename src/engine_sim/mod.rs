//! `spillway engine-sim`: a simulated inference engine (placeholder until issue 3 lands).

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct EngineSimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

pub async fn run(_args: EngineSimArgs) -> anyhow::Result<()> {
    anyhow::bail!("engine-sim is not implemented yet")
}
