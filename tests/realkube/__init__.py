"""Real Kubernetes for the tests: etcd, kube-apiserver and kube-controller-manager built from the Go
module proxy (hack/kube-binaries.sh), started on loopback one set per member cluster, each with its own
CA and admin credentials (``cluster.RealCluster``), a small REST client for the tests' writes
(``rest.Rest``), and the CRDs of the optional kinds isthmus watches (``crds``)."""
