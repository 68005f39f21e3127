#[derive(clap::Args)]
pub struct BenchArgs {}
pub fn bench(_agent: &std::path::Path, _a: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
