"""The sandbox: wasmtime engine, compiled-module cache, warm pools and worker processes.

A container runs in its own worker process. Workers are forked from a zygote
that has already imported wasmtime and loaded hot modules, and wait in a warm
pool; starting a container means claiming one and sending it a `RunSpec`.
"""
