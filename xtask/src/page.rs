//! The connectivity pages of `netwarden matrix --html` and `netwarden diff --html`, checked in
//! a real browser: Debian's chromium renders each headless, takes a screenshot, and dumps the
//! DOM it built, in which every cell of the demo's grid must be a coloured SVG rectangle with
//! its rules as a tooltip.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

/// Where the pages and screenshots go.
const OUT_DIR: &str = "target/netwarden-pages";
/// The demo's workloads, shared by both sides of the diff.
const WORKLOADS: &str = "docs/demo/workloads.yaml";
/// A screenshot of a page with a grid and colours compresses to well over this; a blank or
/// error page to less.
const MIN_SCREENSHOT_BYTES: u64 = 20_000;

/// Renders the demo's before/after page and its matrix on port 8080 with `netwarden` (a
/// built binary), and checks both in chromium. Prints the screenshots' paths.
pub fn check(netwarden: &Path) -> anyhow::Result<()> {
    let out = PathBuf::from(OUT_DIR);
    let empty = out.join("no-policies");
    std::fs::create_dir_all(&empty).with_context(|| format!("creating {}", empty.display()))?;

    let diff_page = out.join("demo-diff.html");
    let status = Command::new(netwarden)
        .args(["diff", "--shared", WORKLOADS])
        .arg(&empty)
        .arg("deploy/examples")
        .arg("--html")
        .arg(&diff_page)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running netwarden diff")?;
    // The example policies close flows: 1 is the expected answer, 2 an error.
    ensure!(
        status.code() == Some(1),
        "netwarden diff exited with {status}, expected 1"
    );
    let matrix_page = out.join("demo-matrix-8080.html");
    let status = Command::new(netwarden)
        .args([
            "matrix",
            "--manifests",
            WORKLOADS,
            "--manifests",
            "deploy/examples",
        ])
        .args(["--port", "8080"])
        .arg("--html")
        .arg(&matrix_page)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running netwarden matrix")?;
    ensure!(status.success(), "netwarden matrix failed: {status}");

    // Two pictures of 5 pods and one outside address: 2 x 36 cells.
    check_page(&diff_page, 72)?;
    // One picture: 36 cells.
    check_page(&matrix_page, 36)
}

/// Screenshots `page` and checks its DOM: `cells` rectangles, each with a tooltip.
fn check_page(page: &Path, cells: usize) -> anyhow::Result<()> {
    let page = std::fs::canonicalize(page)?;
    let url = format!("file://{}", page.display());
    let screenshot = page.with_extension("png");
    let _ = std::fs::remove_file(&screenshot);
    let profile = tempfile_dir()?;

    let status = chromium(&profile)
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg("--window-size=1200,900")
        .arg(&url)
        .status()
        .context("running chromium (apt-get install chromium)")?;
    ensure!(status.success(), "chromium --screenshot failed: {status}");
    let size = std::fs::metadata(&screenshot)
        .with_context(|| format!("chromium wrote no {}", screenshot.display()))?
        .len();
    ensure!(
        size >= MIN_SCREENSHOT_BYTES,
        "{}: {size} bytes, too small for a rendered grid",
        screenshot.display()
    );

    let dom = chromium(&profile)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .context("running chromium --dump-dom")?;
    ensure!(dom.status.success(), "chromium --dump-dom failed");
    let dom = String::from_utf8_lossy(&dom.stdout);
    let rects = dom.matches("<rect ").count();
    let titled = dom.matches("</title></rect>").count();
    if rects != cells {
        bail!(
            "{}: {rects} cells in the DOM, expected {cells}",
            page.display()
        );
    }
    ensure!(
        titled == rects,
        "{}: {rects} cells, {titled} with a tooltip",
        page.display()
    );
    for class in ["allowed", "denied"] {
        ensure!(
            dom.contains(&format!("class=\"{class}")),
            "{}: no {class} cell",
            page.display()
        );
    }
    let _ = std::fs::remove_dir_all(&profile);
    println!(
        "page: {} ({rects} cells with tooltips), screenshot {} ({size} bytes)",
        page.display(),
        screenshot.display()
    );
    Ok(())
}

/// chromium, headless, with nothing that reaches the network or needs a GPU or a sandbox (the
/// tests run as root, where chromium's sandbox refuses to start).
fn chromium(profile: &Path) -> Command {
    let mut command = Command::new("/usr/bin/chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command.stderr(std::process::Stdio::null());
    command
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("netwarden-chromium-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
