"""Nova: run WebAssembly workloads across many Linux hosts."""
