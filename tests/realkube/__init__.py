"""Real Kubernetes for the tests: etcd, kube-apiserver and kube-controller-manager built from the Go
module proxy (hack/kube-binaries.sh), started on loopback one set per member cluster, each with its own
CA and admin credentials (``cluster.RealCluster``), a small REST client for the tests' writes
(``rest.Rest``), the CRDs of the optional kinds isthmus watches (``crds``), fake and real member API
servers behind one interface (``members``), and real nodes running real pods: containerd, kubelet
and kube-proxy in a network namespace per cluster (``node``), with images written from Python
(``images``)."""
