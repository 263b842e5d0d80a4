"""Following a Kubernetes API server: kubeconfig, a small client, reflectors
that list and watch, and Lease-based leader election."""
