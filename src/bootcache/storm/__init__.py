"""The boot storm: boot traces, their replay by many simulated VMs, the benchmark."""
