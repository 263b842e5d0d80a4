"""engine: a Kubernetes Service load balancer on a TUN device."""
