fn main() -> anyhow::Result<()> {
    churnzero_forwarder::cli::main()
}
