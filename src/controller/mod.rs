//! The operator: reconciles InferenceServices into owned objects.

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {}

pub async fn run(_args: ControllerArgs) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
