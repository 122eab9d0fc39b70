//! Prints the fuel table of dist/infermesh.wasm (or
//! `$INFERMESH_WASM_DIR/infermesh.wasm`) against filters/host/budgets.toml:
//!
//!     ./wasm-build.sh && cargo run -p filter-host --example fuel

use filter_host::{cost, Plugin};

fn main() -> filter_host::Result<()> {
    let plugin = Plugin::shipped()?;
    let costs = cost::measure(&plugin)?;
    let budgets = std::fs::read_to_string(cost::budgets_path())
        .map(|t| cost::parse_budgets(&t))
        .unwrap_or_default();
    println!("{}", plugin.path.display());
    print!("{}", cost::table(&costs, &budgets));
    Ok(())
}
