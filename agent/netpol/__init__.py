"""Network policy: model, compiler (pure), kernel backends (eBPF, nftables), policy sources."""
