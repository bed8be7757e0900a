#[allow(dead_code)]
mod names;
#[allow(dead_code)]
mod output;
#[allow(dead_code)]
mod size;
#[allow(dead_code)]
mod statedir;
#[allow(dead_code)]
mod vdevspec;

fn main() {}
