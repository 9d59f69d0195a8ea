//! `relay demo`: placeholder during integration.
pub async fn run(_serve: bool) -> anyhow::Result<i32> {
    Ok(0)
}
