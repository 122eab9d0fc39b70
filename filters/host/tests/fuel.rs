//! The fuel budget: each request type of `filter_host::cost` must cost at
//! most 10 % more fuel than `budgets.toml` says. Fuel is exact, so any
//! change in the count is a change in the module or the request.
//! `INFERMESH_FUEL_UPDATE=1` rewrites the budgets to the measured counts.

use filter_host::{cost, Plugin};

const SLACK: f64 = 1.10;

#[test]
fn every_request_type_stays_within_its_fuel_budget() {
    let plugin = Plugin::shipped().unwrap_or_else(|e| panic!("{e}"));
    let costs = cost::measure(&plugin).unwrap_or_else(|e| panic!("{e:?}"));
    let path = cost::budgets_path();
    if std::env::var_os("INFERMESH_FUEL_UPDATE").is_some_and(|v| v == "1") {
        std::fs::write(&path, cost::render_budgets(&costs)).expect("write budgets");
        eprintln!("budgets rewritten: {}", path.display());
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (INFERMESH_FUEL_UPDATE=1 writes it)",
            path.display()
        )
    });
    let budgets = cost::parse_budgets(&text);
    let table = cost::table(&costs, &budgets);
    eprintln!("{table}");
    let mut over = Vec::new();
    for c in &costs {
        match budgets.iter().find(|(n, _)| n == c.name) {
            None => over.push(format!("{}: no budget in {}", c.name, path.display())),
            Some((_, b)) if c.fuel as f64 > *b as f64 * SLACK => over.push(format!(
                "{}: {} fuel, budget {} (+{:.1} %)",
                c.name,
                c.fuel,
                b,
                (c.fuel as f64 / *b as f64 - 1.0) * 100.0
            )),
            Some(_) => {}
        }
    }
    assert!(
        over.is_empty(),
        "fuel over budget by more than 10 %:\n{}\n\n{table}\nIf the cost is deliberate: \
         INFERMESH_FUEL_UPDATE=1 cargo test -p filter-host --test fuel",
        over.join("\n")
    );
}

#[test]
fn the_same_request_costs_the_same_fuel_every_time() {
    let plugin = Plugin::shipped().unwrap_or_else(|e| panic!("{e}"));
    let a = cost::measure(&plugin).unwrap_or_else(|e| panic!("{e:?}"));
    let b = cost::measure(&plugin).unwrap_or_else(|e| panic!("{e:?}"));
    let fuel = |c: &[cost::Cost]| c.iter().map(|c| c.fuel).collect::<Vec<_>>();
    assert_eq!(fuel(&a), fuel(&b));
    assert!(a.iter().all(|c| c.fuel > 1_000), "{a:?}");
}
