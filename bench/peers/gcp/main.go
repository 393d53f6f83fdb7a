// gcp-peer: a minimal control plane over envoyproxy/go-control-plane's snapshot cache, serving
// resources pushed to it over HTTP, so the bench can drive isthmus and go-control-plane with the
// same simulated Envoys and compare. It generates nothing itself: the bench PUTs the resources
// isthmus's generators produce (serialized protos, base64 in JSON), one snapshot per group.
//
// The group (snapshot cache node hash) is the node's locality sub_zone, where isthmus bootstraps
// put the member cluster name, falling back to node.cluster; all Envoys of a group share a snapshot.
//
// PUT /snapshot/{group} replaces a group's snapshot (one version for every type). PATCH
// /snapshot/{group} derives the next snapshot from the current one, as a go-control-plane
// controller that keeps its objects does: only the resources named in "set" are decoded, the others
// are reused as they are, and only the types it touches get the new version (untouched types keep
// theirs, so SotW streams are not re-sent them).
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"sync"
	"sync/atomic"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	gcplog "github.com/envoyproxy/go-control-plane/pkg/log"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"
)

// groupHash maps a node to its snapshot group.
type groupHash struct{}

func (groupHash) ID(node *corev3.Node) string {
	if node == nil {
		return ""
	}
	if sz := node.GetLocality().GetSubZone(); sz != "" {
		return sz
	}
	return node.GetCluster()
}

// newMessage returns an empty message of the Go type for a type URL, or nil if not served.
func newMessage(typeURL string) proto.Message {
	switch typeURL {
	case resourcev3.ClusterType:
		return &clusterv3.Cluster{}
	case resourcev3.EndpointType:
		return &endpointv3.ClusterLoadAssignment{}
	case resourcev3.ListenerType:
		return &listenerv3.Listener{}
	case resourcev3.RouteType:
		return &routev3.RouteConfiguration{}
	case resourcev3.SecretType:
		return &tlsv3.Secret{}
	}
	return nil
}

type snapshotBody struct {
	Version   string              `json:"version"`
	Resources map[string][]string `json:"resources"`
}

// patchBody: the resources to add or replace, and the names to remove, by type URL.
type patchBody struct {
	Version string              `json:"version"`
	Set     map[string][]string `json:"set"`
	Remove  map[string][]string `json:"remove"`
}

// decodeResources decodes one type's base64 serialized resources, by name; errors are the client's
// fault (400).
func decodeResources(typeURL string, encoded []string) (map[string]types.Resource, error) {
	if newMessage(typeURL) == nil {
		return nil, fmt.Errorf("unsupported type URL %q", typeURL)
	}
	out := make(map[string]types.Resource, len(encoded))
	for i, b64 := range encoded {
		raw, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: bad base64: %v", typeURL, i, err)
		}
		msg := newMessage(typeURL)
		if err := proto.Unmarshal(raw, msg); err != nil {
			return nil, fmt.Errorf("%s[%d]: not a valid message: %v", typeURL, i, err)
		}
		name := cachev3.GetResourceName(msg)
		if name == "" {
			return nil, fmt.Errorf("%s[%d]: resource has no name", typeURL, i)
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("%s: duplicate resource name %q", typeURL, name)
		}
		out[name] = msg
	}
	return out, nil
}

// decodeSnapshot turns a PUT body into a snapshot; errors are the client's fault (400).
func decodeSnapshot(body snapshotBody) (*cachev3.Snapshot, int, error) {
	if body.Version == "" {
		return nil, 0, fmt.Errorf("missing \"version\"")
	}
	byType := make(map[resourcev3.Type][]types.Resource, len(body.Resources))
	count := 0
	for typeURL, encoded := range body.Resources {
		decoded, err := decodeResources(typeURL, encoded)
		if err != nil {
			return nil, 0, err
		}
		for _, msg := range decoded {
			byType[typeURL] = append(byType[typeURL], msg)
		}
		count += len(decoded)
	}
	snap, err := cachev3.NewSnapshot(body.Version, byType)
	if err != nil {
		return nil, 0, err
	}
	return snap, count, nil
}

// patchSnapshot builds the snapshot that follows old from a PATCH body: the types it names get a new
// item map (the old one's entries, less the removed names, plus the decoded "set" resources) and
// the new version; every other type is carried over unchanged. The version map (delta xDS hashes)
// is left for the cache to build, as it does for any new snapshot.
func patchSnapshot(old *cachev3.Snapshot, body patchBody) (*cachev3.Snapshot, int, error) {
	if body.Version == "" {
		return nil, 0, fmt.Errorf("missing \"version\"")
	}
	next := &cachev3.Snapshot{Resources: old.Resources}
	touched := make(map[string]bool, len(body.Set)+len(body.Remove))
	for typeURL := range body.Set {
		touched[typeURL] = true
	}
	for typeURL := range body.Remove {
		touched[typeURL] = true
	}
	count := 0
	for typeURL := range touched {
		index := cachev3.GetResponseType(typeURL)
		if newMessage(typeURL) == nil || index == types.UnknownType {
			return nil, 0, fmt.Errorf("unsupported type URL %q", typeURL)
		}
		decoded, err := decodeResources(typeURL, body.Set[typeURL])
		if err != nil {
			return nil, 0, err
		}
		before := old.Resources[index].Items
		items := make(map[string]types.ResourceWithTTL, len(before)+len(decoded))
		for name, item := range before {
			items[name] = item
		}
		for _, name := range body.Remove[typeURL] {
			if _, ok := items[name]; !ok {
				return nil, 0, fmt.Errorf("%s: cannot remove %q: not in the snapshot", typeURL, name)
			}
			if _, ok := decoded[name]; ok {
				return nil, 0, fmt.Errorf("%s: %q is both set and removed", typeURL, name)
			}
			delete(items, name)
		}
		for name, msg := range decoded {
			items[name] = types.ResourceWithTTL{Resource: msg}
		}
		next.Resources[index] = cachev3.Resources{Version: body.Version, Items: items}
		count += len(decoded) + len(body.Remove[typeURL])
	}
	return next, count, nil
}

// counters for GET /stats, kept by the server callbacks.
type counters struct {
	sotwStreams, deltaStreams, requests, responses atomic.Int64
}

func (c *counters) callbacks() serverv3.CallbackFuncs {
	return serverv3.CallbackFuncs{
		StreamOpenFunc:        func(context.Context, int64, string) error { c.sotwStreams.Add(1); return nil },
		StreamClosedFunc:      func(int64, *corev3.Node) { c.sotwStreams.Add(-1) },
		DeltaStreamOpenFunc:   func(context.Context, int64, string) error { c.deltaStreams.Add(1); return nil },
		DeltaStreamClosedFunc: func(int64, *corev3.Node) { c.deltaStreams.Add(-1) },
		StreamRequestFunc:     func(int64, *discoveryv3.DiscoveryRequest) error { c.requests.Add(1); return nil },
		StreamResponseFunc: func(context.Context, int64, *discoveryv3.DiscoveryRequest, *discoveryv3.DiscoveryResponse) {
			c.responses.Add(1)
		},
		StreamDeltaRequestFunc: func(int64, *discoveryv3.DeltaDiscoveryRequest) error { c.requests.Add(1); return nil },
		StreamDeltaResponseFunc: func(int64, *discoveryv3.DeltaDiscoveryRequest, *discoveryv3.DeltaDiscoveryResponse) {
			c.responses.Add(1)
		},
	}
}

// decodeJSON decodes a request body strictly, answering 400 itself when it cannot.
func decodeJSON(w http.ResponseWriter, r *http.Request, into any) bool {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(into); err != nil {
		http.Error(w, "bad JSON: "+err.Error(), http.StatusBadRequest)
		return false
	}
	return true
}

func controlAPI(cache cachev3.SnapshotCache, stats *counters) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("ok\n"))
	})
	// One writer at a time: a PATCH reads the group's snapshot and replaces it.
	var writing sync.Mutex
	mux.HandleFunc("PUT /snapshot/{group}", func(w http.ResponseWriter, r *http.Request) {
		group := r.PathValue("group")
		var body snapshotBody
		if !decodeJSON(w, r, &body) {
			return
		}
		snap, n, err := decodeSnapshot(body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err := snap.Consistent(); err != nil {
			// Served anyway; in ADS mode a SotW EDS/RDS request is answered only when it names
			// every resource of that type in the snapshot.
			log.Printf("WARN group %q: snapshot %q not consistent: %v", group, body.Version, err)
		}
		writing.Lock()
		defer writing.Unlock()
		if err := cache.SetSnapshot(r.Context(), group, snap); err != nil {
			http.Error(w, "set snapshot: "+err.Error(), http.StatusInternalServerError)
			return
		}
		log.Printf("group %q: snapshot %q set (%d resources)", group, body.Version, n)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("PATCH /snapshot/{group}", func(w http.ResponseWriter, r *http.Request) {
		group := r.PathValue("group")
		var body patchBody
		if !decodeJSON(w, r, &body) {
			return
		}
		writing.Lock()
		defer writing.Unlock()
		current, err := cache.GetSnapshot(group)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		old, ok := current.(*cachev3.Snapshot)
		if !ok {
			http.Error(w, fmt.Sprintf("group %q: snapshot of type %T", group, current), http.StatusInternalServerError)
			return
		}
		snap, n, err := patchSnapshot(old, body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err := cache.SetSnapshot(r.Context(), group, snap); err != nil {
			http.Error(w, "set snapshot: "+err.Error(), http.StatusInternalServerError)
			return
		}
		log.Printf("group %q: snapshot %q patched (%d resources set or removed)", group, body.Version, n)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"sotw_streams":  stats.sotwStreams.Load(),
			"delta_streams": stats.deltaStreams.Load(),
			"streams":       stats.sotwStreams.Load() + stats.deltaStreams.Load(),
			"requests":      stats.requests.Load(),
			"responses":     stats.responses.Load(),
			"groups":        cache.GetStatusKeys(),
		})
	})
	return mux
}

func main() {
	xdsAddr := flag.String("xds", "127.0.0.1:18000", "gRPC ADS listen address")
	controlAddr := flag.String("control", "127.0.0.1:18001", "HTTP control API listen address")
	verbose := flag.Bool("v", false, "log go-control-plane debug messages")
	flag.Parse()

	logger := gcplog.LoggerFuncs{
		WarnFunc:  func(f string, a ...any) { log.Printf("WARN "+f, a...) },
		ErrorFunc: func(f string, a ...any) { log.Printf("ERROR "+f, a...) },
	}
	if *verbose {
		logger.DebugFunc = func(f string, a ...any) { log.Printf("DEBUG "+f, a...) }
		logger.InfoFunc = func(f string, a ...any) { log.Printf("INFO "+f, a...) }
	}
	cache := cachev3.NewSnapshotCache(true, groupHash{}, logger)
	stats := &counters{}
	xds := serverv3.NewServer(context.Background(), cache, stats.callbacks())

	grpcServer := grpc.NewServer(
		grpc.MaxConcurrentStreams(1<<20),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{PermitWithoutStream: true}),
	)
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(grpcServer, xds) // SotW and Delta ADS

	lis, err := net.Listen("tcp", *xdsAddr)
	if err != nil {
		log.Fatalf("listen %s: %v", *xdsAddr, err)
	}
	go func() {
		log.Printf("control API on http://%s", *controlAddr)
		log.Fatal(http.ListenAndServe(*controlAddr, controlAPI(cache, stats)))
	}()
	log.Printf("ADS (SotW + Delta) on %s", lis.Addr())
	log.Fatal(grpcServer.Serve(lis))
}
