//! Rebuilds the crate when a migration changes: `sqlx::migrate!` embeds the
//! migration directories at compile time, and cargo does not watch them by
//! itself, so a new migration would otherwise be missing from an
//! incremental build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
