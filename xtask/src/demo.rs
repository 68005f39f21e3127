pub fn demo(_agent: &std::path::Path, _hold: bool) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
