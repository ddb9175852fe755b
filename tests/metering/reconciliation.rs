//! Reconciliation figures per tenant and day (report and metrics), and
//! `embedgate usage --reconcile` against an upstream usage export.

use super::*;

use std::collections::BTreeMap;

/// Per tenant: (hit units, miss units) of the tally.
fn per_tenant(tally: &Tally) -> BTreeMap<String, (u64, u64)> {
    let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for ((t, _, c), (_, u)) in &tally.cells {
        let e = m.entry(t.clone()).or_default();
        match c.as_str() {
            "hit" => e.0 += u,
            _ => e.1 += u,
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_per_tenant_and_day_and_the_upstream_export() {
    let gw = alpha()
        .tenant_toml("workspace = \"ws-alpha\"")
        .tenant("beta", BETA_KEY)
        .start()
        .await;
    let mut tally = Tally::default();
    misses_and_hits(&gw, &mut tally, "rec", 5).await;
    // One miss whose upstream usage disagrees: 1 text + 1 image (factor 2)
    // computed as 2 units, billed by upstream as 3.
    let b = items_body(&[
        ("text", "rec mismatch".into(), None),
        (
            "image",
            "https://img.example/rec.png".into(),
            Some(json!(2)),
        ),
    ]);
    gw.fake.push_faults([Fault::WrongUsage]);
    let r = send(&gw, &mut tally, "alpha", ALPHA_KEY, &b).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    let units = per_tenant(&tally);
    assert_eq!(
        units.values().map(|u| u.1).sum::<u64>(),
        gw.fake.billed_units()
    );

    // The report's figures.
    let d = today();
    let v = gw
        .get(&usage_path(None, false), Some(ADMIN_TOKEN))
        .await
        .json();
    assert_eq!(rows_cells(&v), tally.cells);
    let figures = v["reconciliation"].as_array().unwrap();
    assert_eq!(figures.len(), 2, "{v}");
    for f in figures {
        let t = f["tenant"].as_str().unwrap();
        let (hit, miss) = units[t];
        let (computed, mismatches) = if t == "alpha" {
            (miss - 1, 1)
        } else {
            (miss, 0)
        };
        assert_eq!(
            f,
            &json!({
                "tenant": t, "day": d, "requests": if t == "alpha" { 11 } else { 10 },
                "hit_units": hit, "miss_units": miss, "upstream_units": miss,
                "computed_units": computed, "unknown_units": 0, "mismatches": mismatches,
                "model": MODEL,
            }),
            "{t}"
        );
    }
    // The rows carry the gateway's own figure next to the record.
    let rows = v["rows"].as_array().unwrap();
    let text_miss = rows
        .iter()
        .find(|r| r["tenant"] == "alpha" && r["modality"] == "text" && r["cache"] == "miss")
        .unwrap();
    assert_eq!(
        text_miss["units"].as_u64().unwrap(),
        text_miss["computed_units"].as_u64().unwrap() + 1,
        "{text_miss}"
    );

    // As CSV, from the admin API and from the CLI.
    let csv = gw
        .get(
            &format!("{}&format=csv&view=reconciliation", usage_path(None, false)),
            Some(ADMIN_TOKEN),
        )
        .await
        .text;
    assert!(csv.starts_with("tenant,day,requests,hit_units,miss_units,upstream_units,computed_units,unknown_units,mismatches,model\n"), "{csv}");
    let (ah, am) = units["alpha"];
    assert!(
        csv.contains(&format!(
            "alpha,{d},11,{ah},{am},{am},{},0,1,{MODEL}\n",
            am - 1
        )),
        "{csv}"
    );
    assert_eq!(
        cli_usage(&gw, &["--format", "csv", "--view", "reconciliation"]).await,
        csv
    );

    // The same figures as metrics.
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_upstream_units_total",
            &[("tenant", "alpha")]
        ),
        am as f64
    );
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_computed_units_total",
            &[("tenant", "alpha"), ("cache", "miss")]
        ),
        (am - 1) as f64
    );
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_computed_units_total",
            &[("tenant", "beta"), ("cache", "hit")]
        ),
        units["beta"].0 as f64
    );

    // The ledger against upstream's export: per day, per workspace, per
    // tenant.
    let dir = tempfile::tempdir().unwrap();
    let billed = gw.fake.billed_units();
    let (bh, bm) = units["beta"];
    let _ = (ah, bh);
    for (name, export, want_code, want) in [
        (
            "by day",
            format!("Day,Units,Product\n{d},{billed},one-peace\n"),
            0,
            format!("day,ledger_units,unknown_units,upstream_units,computed_units,export_units,difference,status\n{d},{billed},0,{billed},{},{billed},0,ok\n", billed - 1),
        ),
        (
            "by workspace",
            format!("day,workspace,units\n{d},ws-alpha,{am}\n{d},,{bm}\n"),
            0,
            format!("day,workspace,ledger_units,unknown_units,upstream_units,computed_units,export_units,difference,status\n{d},,{bm},0,{bm},{bm},{bm},0,ok\n{d},ws-alpha,{am},0,{am},{},{am},0,ok\n", am - 1),
        ),
        (
            "a day upstream billed more",
            format!("day,tenant,units\n{d},alpha,{}\n{d},beta,{bm}\n", am + 5),
            1,
            format!("{d},alpha,{am},0,{am},{},{},5,mismatch\n", am - 1, am + 5),
        ),
    ] {
        let path = dir.path().join("export.csv");
        std::fs::write(&path, &export).unwrap();
        let (code, out, err) = cli(
            &gw.config_path,
            &gw.work_dir,
            &["--reconcile", path.to_str().unwrap()],
        )
        .await;
        assert_eq!(code, Some(want_code), "{name}: {out}\n{err}");
        assert!(out.contains(&want), "{name}:\n{out}\nwant:\n{want}");
        assert!(err.contains("compared"), "{name}: {err}");
    }
    // A bad export is an error naming the line.
    let path = dir.path().join("bad.csv");
    std::fs::write(&path, "day,units\n2026-1-1,3\n").unwrap();
    let (code, _, err) = cli(
        &gw.config_path,
        &gw.work_dir,
        &["--reconcile", path.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(err.contains("line 2: day `2026-1-1`"), "{err}");
}
