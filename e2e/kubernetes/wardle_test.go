// TestWardle runs a real aggregated API server, k8s.io/sample-apiserver ("wardle"), in a
// pod whose only etcd is the shim, and uses it through its REST API as a client of an
// aggregated apiserver would: the storage tests show that the etcd3 store works through
// the shim; this shows that a whole apiserver built on it does (watch cache, consistent
// reads from the cache, watch-list, health checks), that its keys stay in the tenant's
// prefix, that a second tenant's apiserver does not see them, and that a watch survives
// the loss of the broker the shim uses.
//
// The binary is built from the module's own requirement (go.mod: v0.37; go.v034.mod:
// v0.34), from this directory:
//
//	go build -o <dir>/wardle k8s.io/sample-apiserver
//
// and found through WARDLE_BIN.
package kubernetes

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// wardleFlags are the flags of a wardle that runs on its own, with no kube-apiserver
// anywhere, each with why it is there:
//
//   - --etcd-servers=http://127.0.0.1:2379: the shim on the pod's loopback is its only
//     etcd.
//   - --secure-port=8443, --bind-address=0.0.0.0: serve HTTPS on every address of the
//     pod, so the test reaches it from the root namespace over the veth, as the
//     kube-aggregator would over the pod network.
//   - --cert-dir: no serving certificate is given, so it generates a self-signed one
//     (and its CA) there; the test trusts that CA.
//   - --client-ca-file: clients authenticate with certificates of the test's CA; the
//     test's client certificate has O=system:masters.
//   - --authentication-skip-lookup: do not read the client and request-header CAs from
//     the kube-system/extension-apiserver-authentication ConfigMap of a kube-apiserver.
//   - --authentication-kubeconfig, --authorization-kubeconfig, --kubeconfig: the
//     delegated TokenReview and SubjectAccessReview clients and the "core" API client
//     must exist (without them it wants an in-cluster config and does not start), so they
//     point at an address where nothing listens. They are never called for the test's
//     requests: the client certificate authenticates before any TokenReview, system:masters
//     is always allowed (the default of --authorization-always-allow-groups), and
//     /healthz, /livez and /readyz are always allowed paths.
//   - --enable-priority-and-fairness=false: API Priority and Fairness reads its
//     FlowSchemas from the kube-apiserver; with it on, /readyz fails informer-sync forever.
//   - --disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,
//     ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy: each
//     waits for informers of the kube-apiserver (namespaces, webhook and policy
//     configurations) and until then refuses every write with 403 "not yet ready to
//     handle request" (and /readyz fails informer-sync). Wardle's own BanFlunder stays on:
//     its informer is of wardle's own Fischers, over wardle's loopback client.
var wardleFlags = []string{
	"--etcd-servers=http://127.0.0.1:2379",
	"--secure-port=" + strconv.Itoa(wardlePort),
	"--bind-address=0.0.0.0",
	"--authentication-skip-lookup",
	"--enable-priority-and-fairness=false",
	"--disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy",
}

const (
	wardlePort = 8443
	// flunders is the collection the test works on, in one namespace of each tenant's
	// wardle (the same name in both: isolation is by tenant, not by namespace).
	flunderNamespace = "e2e"
	flundersPath     = "/apis/wardle.example.com/v1alpha1/namespaces/" + flunderNamespace + "/flunders"
	// flunderKeys is where wardle keeps them, in the tenant's view of etcd.
	flunderKeys = "/registry/wardle.example.com/wardle.example.com/flunders/" + flunderNamespace + "/"
)

// otherTenant is the second tenant, with a wardle of its own.
var otherTenant = tenantCred{token: "kubernetes-e2e-token-other", name: "kube-e2e-other/apiserver"}

func TestWardle(t *testing.T) {
	bin := os.Getenv("WARDLE_BIN")
	if bin == "" {
		t.Skip("WARDLE_BIN is not set: build k8s.io/sample-apiserver (go build -o <dir>/wardle k8s.io/sample-apiserver in e2e/kubernetes) and point WARDLE_BIN at it")
	}
	if !viaShim {
		t.Skip("TestWardle is about wardle through the shim; KUBE_STORAGE_VIA=direct has nothing to compare it with")
	}
	start := time.Now()

	e := startEtcd(t, etcdOptions{})
	// Two brokers on the same etcd, both knowing both tenants: the shims fail over between
	// them.
	b1 := startBroker(t, e.url, defaultTenant, otherTenant)
	b2 := startBroker(t, e.url, defaultTenant, otherTenant)
	ca := newTestCA(t)
	admin := ca.clientCert(t, "e2e-admin", "system:masters")

	// Both tenants' pods and wardles start at once; wardle takes seconds to be ready.
	podA, podB := startPod(t), startPod(t)
	podA.startShim(t, b1, b2)
	podB.startShimAs(t, otherTenant, b1, b2)
	wa := startWardle(t, "wardle-a", podA, bin, ca, admin)
	wb := startWardle(t, "wardle-b", podB, bin, ca, admin)
	wa.waitReady(t)
	wb.waitReady(t)
	t.Logf("both wardles ready after %v", time.Since(start).Round(time.Millisecond))

	// Each step builds on the objects of those before it, so the first failure ends the
	// test. The failover is last: it stops the second tenant and a broker.
	steps := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"CRUD", func(t *testing.T) { wardleCRUD(t, wa) }},
		{"Paging", func(t *testing.T) { wardlePaging(t, wa) }},
		{"WatchList", func(t *testing.T) { wardleWatchList(t, wa) }},
		{"Health", func(t *testing.T) { wardleHealth(t, wa) }},
		{"Isolation", func(t *testing.T) { wardleIsolation(t, wa, wb) }},
		{"KeysInEtcd", func(t *testing.T) { wardleKeysInEtcd(t, e, wa, wb) }},
		{"WatchSurvivesBrokerLoss", func(t *testing.T) { wardleFailover(t, wa, wb, podB, []*broker{b1, b2}) }},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.run) {
			return
		}
	}
	t.Logf("TestWardle took %v", time.Since(start).Round(time.Millisecond))
}

// wardleCRUD: create, get, update (and a stale update refused), a watch from a
// resourceVersion that sees each change in order, delete.
func wardleCRUD(t *testing.T, w *wardle) {
	ctx := t.Context()
	created := w.create(t, "crud")
	if created.UID == "" || created.ResourceVersion == "" {
		t.Fatalf("created flunder has no uid or resourceVersion: %+v", created.ObjectMeta)
	}
	// A plain watch from the creation's resourceVersion: what follows it, nothing before.
	events := w.watch(t, "resourceVersion="+created.ResourceVersion)

	var got flunder
	if code, err := w.do(ctx, http.MethodGet, flundersPath+"/crud", nil, &got); err != nil || code != http.StatusOK {
		t.Fatalf("get: %d %v", code, err)
	}
	if got.UID != created.UID || got.ResourceVersion != created.ResourceVersion {
		t.Fatalf("get answered %s@%s, created %s@%s", got.UID, got.ResourceVersion, created.UID, created.ResourceVersion)
	}

	// Update with the current resourceVersion.
	upd := got
	upd.Spec.Reference = "crud-ref"
	var updated flunder
	if code, err := w.do(ctx, http.MethodPut, flundersPath+"/crud", upd, &updated); err != nil || code != http.StatusOK {
		t.Fatalf("update: %d %v", code, err)
	}
	if updated.Spec.Reference != "crud-ref" || updated.ResourceVersion == got.ResourceVersion {
		t.Fatalf("update answered reference %q at resourceVersion %s (was %s)", updated.Spec.Reference, updated.ResourceVersion, got.ResourceVersion)
	}
	// The same update again carries the now stale resourceVersion: a conflict.
	upd.Spec.Reference = "stale"
	if code, err := w.do(ctx, http.MethodPut, flundersPath+"/crud", upd, nil); code != http.StatusConflict {
		t.Fatalf("update with stale resourceVersion %s: want 409, got %d %v", upd.ResourceVersion, code, err)
	}
	if code, err := w.do(ctx, http.MethodGet, flundersPath+"/crud", nil, &got); err != nil || code != http.StatusOK || got.Spec.Reference != "crud-ref" {
		t.Fatalf("after the refused update: %d %v, reference %q", code, err, got.Spec.Reference)
	}

	second := w.create(t, "crud-2")
	var status metav1.Status
	if code, err := w.do(ctx, http.MethodDelete, flundersPath+"/crud", nil, &status); err != nil || code != http.StatusOK {
		t.Fatalf("delete: %d %v", code, err)
	}
	if code, _ := w.do(ctx, http.MethodGet, flundersPath+"/crud", nil, nil); code != http.StatusNotFound {
		t.Fatalf("get after delete: want 404, got %d", code)
	}

	// The watch saw exactly that, in order: the update, the second create, the delete.
	want := []struct{ typ, name, rv string }{
		{"MODIFIED", "crud", updated.ResourceVersion},
		{"ADDED", "crud-2", second.ResourceVersion},
		{"DELETED", "crud", ""},
	}
	for _, wnt := range want {
		ev := events.next(t, 15*time.Second)
		f := ev.flunder(t)
		if ev.Type != wnt.typ || f.Name != wnt.name || (wnt.rv != "" && f.ResourceVersion != wnt.rv) {
			t.Fatalf("watch event: want %s %s@%s, got %s %s@%s", wnt.typ, wnt.name, wnt.rv, ev.Type, f.Name, f.ResourceVersion)
		}
	}
	w.delete(t, "crud-2")
}

// wardlePaging: enough objects for several pages, listed with limit and continue.
func wardlePaging(t *testing.T, w *wardle) {
	const n, limit = 23, 5
	var want []string
	for i := range n {
		name := fmt.Sprintf("page-%02d", i)
		w.create(t, name)
		want = append(want, name)
	}
	var got []string
	cont, pages, listRV := "", 0, ""
	for {
		q := url.Values{"limit": {strconv.Itoa(limit)}}
		if cont != "" {
			q.Set("continue", cont)
		}
		var l flunderList
		if code, err := w.do(t.Context(), http.MethodGet, flundersPath+"?"+q.Encode(), nil, &l); err != nil || code != http.StatusOK {
			t.Fatalf("list page %d: %d %v", pages, code, err)
		}
		pages++
		if len(l.Items) > limit {
			t.Fatalf("page %d has %d items, limit %d", pages, len(l.Items), limit)
		}
		// Every page of one list is of the same snapshot.
		if listRV == "" {
			listRV = l.ResourceVersion
		} else if l.ResourceVersion != listRV {
			t.Fatalf("page %d at resourceVersion %s, the first at %s", pages, l.ResourceVersion, listRV)
		}
		for _, f := range l.Items {
			got = append(got, f.Name)
		}
		if l.Continue == "" {
			break
		}
		cont = l.Continue
		if pages > n {
			t.Fatal("list does not end")
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("paged list: got %v, want %v", got, want)
	}
	if wantPages := (n + limit - 1) / limit; pages != wantPages {
		t.Fatalf("%d pages, want %d", pages, wantPages)
	}
}

// wardleWatchList: a watch that starts with the current state (sendInitialEvents), then
// the bookmark that ends it, then what changes.
func wardleWatchList(t *testing.T, w *wardle) {
	names := w.names(t)
	if len(names) == 0 {
		t.Fatal("nothing to list")
	}
	events := w.watch(t, "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true")
	var initial []string
	var endRV string
	for endRV == "" {
		ev := events.next(t, 20*time.Second)
		f := ev.flunder(t)
		switch ev.Type {
		case "ADDED":
			initial = append(initial, f.Name)
		case "BOOKMARK":
			// Bookmarks before the end are allowed; the end is marked by the annotation.
			if f.Annotations[metav1.InitialEventsAnnotationKey] == "true" {
				endRV = f.ResourceVersion
			}
		default:
			t.Fatalf("before the initial-events-end bookmark: %s %s", ev.Type, f.Name)
		}
	}
	slices.Sort(initial)
	if !slices.Equal(initial, names) {
		t.Fatalf("initial events: got %v, want %v", initial, names)
	}
	created := w.create(t, "after-bookmark")
	for {
		ev := events.next(t, 15*time.Second)
		f := ev.flunder(t)
		if ev.Type == "BOOKMARK" {
			continue
		}
		if ev.Type != "ADDED" || f.Name != "after-bookmark" || f.ResourceVersion != created.ResourceVersion {
			t.Fatalf("after the bookmark at %s: want ADDED after-bookmark@%s, got %s %s@%s", endRV, created.ResourceVersion, ev.Type, f.Name, f.ResourceVersion)
		}
		break
	}
}

// wardleHealth: its etcd checks, which go through the shim, pass.
func wardleHealth(t *testing.T, w *wardle) {
	for _, path := range []string{"/readyz/etcd", "/livez/etcd", "/readyz"} {
		body, code, err := w.get(t.Context(), path)
		if err != nil || code != http.StatusOK || strings.TrimSpace(body) != "ok" {
			t.Fatalf("%s: %d %q %v", path, code, body, err)
		}
	}
}

// wardleIsolation: the other tenant's wardle, same namespace and resource, sees none of
// the first's flunders, and the first none of its.
func wardleIsolation(t *testing.T, a, b *wardle) {
	ctx := t.Context()
	if names := b.names(t); len(names) != 0 {
		t.Fatalf("the other tenant's wardle lists %v", names)
	}
	aNames := a.names(t)
	if code, _ := b.do(ctx, http.MethodGet, flundersPath+"/"+aNames[0], nil, nil); code != http.StatusNotFound {
		t.Fatalf("the other tenant's wardle gets %s: %d", aNames[0], code)
	}
	b.create(t, "other-tenant")
	// The first tenant's wardle does not see it, and its list has not changed.
	if code, _ := a.do(ctx, http.MethodGet, flundersPath+"/other-tenant", nil, nil); code != http.StatusNotFound {
		t.Fatalf("the first tenant's wardle gets the other's flunder: %d", code)
	}
	if names := a.names(t); !slices.Equal(names, aNames) {
		t.Fatalf("the first tenant's list changed: %v, was %v", names, aNames)
	}
	if names := b.names(t); !slices.Equal(names, []string{"other-tenant"}) {
		t.Fatalf("the other tenant's list: %v", names)
	}
}

// wardleKeysInEtcd: in etcd itself each tenant's flunders are under its prefix, and
// nothing else is outside the tenants' prefixes but the brokers' own records.
//
// Wardle's key for a flunder is /registry/wardle.example.com (its --etcd-prefix), then
// wardle.example.com/flunders (the group and resource), then namespace and name; the
// broker puts the tenant prefix in front of it as it is, so in etcd the two meet at "//".
func wardleKeysInEtcd(t *testing.T, e *etcdProcess, a, b *wardle) {
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{e.url}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	resp, err := c.Get(ctx, "\x00", clientv3.WithFromKey(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	tenants := []struct {
		cred   tenantCred
		wardle *wardle
	}{{defaultTenant, a}, {otherTenant, b}}
	stored := map[string][]string{}
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		owner := ""
		for _, tn := range tenants {
			if strings.HasPrefix(k, tn.cred.prefix()) {
				owner = tn.cred.name
				if name, ok := strings.CutPrefix(k, tn.cred.prefix()+flunderKeys); ok {
					stored[owner] = append(stored[owner], name)
				}
			}
		}
		// Outside the tenants only the brokers' private records (leases, compactions)
		// may be, under their root beside tenants/.
		if owner == "" && (!strings.HasPrefix(k, "/etcd-shim/") || strings.HasPrefix(k, "/etcd-shim/tenants/") ||
			strings.Contains(k, "wardle") || strings.Contains(k, "flunder")) {
			t.Errorf("key outside every tenant prefix: %q", k)
		}
	}
	for _, tn := range tenants {
		got := stored[tn.cred.name]
		slices.Sort(got)
		if want := tn.wardle.names(t); len(want) == 0 || !slices.Equal(got, want) {
			t.Errorf("flunder keys of %s in etcd under %q: %v; its wardle lists %v", tn.cred.name, tn.cred.prefix()+flunderKeys, got, want)
		}
	}
	// A stored value is the object wardle wrote.
	key := defaultTenant.prefix() + flunderKeys + "page-00"
	v, err := c.Get(ctx, key)
	if err != nil || len(v.Kvs) != 1 || !bytes.Contains(v.Kvs[0].Value, []byte("page-00")) {
		t.Fatalf("etcd value of %s: %v %v", key, v, err)
	}
}

// wardleFailover: a watch that is open when the broker its shim uses stops keeps going
// through the other broker. The apiserver's watch cache holds the etcd watch; the etcd
// client resumes it from its last revision when the shim ends the stream with
// Unavailable, so the HTTP watch never notices.
func wardleFailover(t *testing.T, a, b *wardle, podB *pod, brokers []*broker) {
	// The other tenant goes first, so that the brokers' connection gauges count the first
	// tenant's shim alone.
	b.proc.stop()
	podB.shim.stop()
	var used, spare *broker
	waitFor(t, "the shim's connections and watches to be on one broker", 15*time.Second, func() error {
		var open [2]float64
		for i, b := range brokers {
			conns, err := b.metric("etcd_broker_shim_connections_open")
			if err != nil {
				return err
			}
			watches, err := b.metric("etcd_broker_watch_streams_open")
			if err != nil {
				return err
			}
			open[i] = conns + watches
		}
		switch {
		case open[0] > 0 && open[1] == 0:
			used, spare = brokers[0], brokers[1]
		case open[1] > 0 && open[0] == 0:
			used, spare = brokers[1], brokers[0]
		default:
			return fmt.Errorf("shim connections and watch streams open: %v on the first broker, %v on the second", open[0], open[1])
		}
		return nil
	})

	events := a.watch(t, "resourceVersion="+a.list(t).ResourceVersion)
	before := a.create(t, "before-failover")
	events.expectAdded(t, before, 15*time.Second)

	stopped := time.Now()
	used.stop()
	t.Logf("stopped the broker the shim used (%s) in %v", used.proc.exit(), time.Since(stopped).Round(time.Millisecond))
	// The create may meet the broker's loss (a write is not retried by the etcd client):
	// retried as any client of an apiserver would.
	var after flunder
	var refused []string
	waitFor(t, "a create after the broker stopped", 30*time.Second, func() error {
		code, err := a.do(t.Context(), http.MethodPost, flundersPath, newFlunder("after-failover"), &after)
		if code == http.StatusConflict {
			// An earlier attempt got through after all.
			code, err = a.do(t.Context(), http.MethodGet, flundersPath+"/after-failover", nil, &after)
		}
		if err == nil && code != http.StatusCreated && code != http.StatusOK {
			err = fmt.Errorf("create: %d", code)
		}
		if err != nil {
			refused = append(refused, err.Error())
		}
		return err
	})
	if len(refused) > 0 {
		t.Logf("the create was refused %d times during the failover, first: %s", len(refused), refused[0])
	}
	// The same HTTP watch stream, opened before the failover, delivers it.
	events.expectAdded(t, after, 30*time.Second)
	t.Logf("the watch delivered the event %v after the broker stopped", time.Since(stopped).Round(time.Millisecond))

	if n, err := spare.metric("etcd_broker_watch_streams_open"); err != nil || n == 0 {
		t.Fatalf("the other broker has %v watch streams open (%v): the watch did not move to it", n, err)
	}
	waitFor(t, "wardle's etcd check to pass through the other broker", 15*time.Second, func() error {
		return a.getOK(t.Context(), "/readyz/etcd")
	})
}

// wardle is one running sample-apiserver in a pod, and an HTTPS client for it.
type wardle struct {
	name    string
	proc    *proc
	base    string
	certDir string
	// admin is the client certificate the test presents; client is set once wardle has
	// written its serving certificate, which it trusts.
	admin  tls.Certificate
	client *http.Client
}

// startWardle starts wardle in the pod, on the shim; waitReady waits for it.
func startWardle(t *testing.T, name string, p *pod, bin string, ca *testCA, admin tls.Certificate) *wardle {
	t.Helper()
	dir := filepath.Join(p.dir, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "client-ca.crt")
	if err := os.WriteFile(caFile, ca.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	// Nothing listens on the pod's port 1: every call of the delegated clients fails at
	// once with connection refused.
	nowhere := filepath.Join(dir, "nowhere.kubeconfig")
	if err := os.WriteFile(nowhere, []byte(nowhereKubeconfig), 0o600); err != nil {
		t.Fatal(err)
	}
	certDir := filepath.Join(dir, "serving")
	args := append(slices.Clone(wardleFlags),
		"--cert-dir="+certDir,
		"--client-ca-file="+caFile,
		"--authentication-kubeconfig="+nowhere,
		"--authorization-kubeconfig="+nowhere,
		"--kubeconfig="+nowhere)
	return &wardle{
		name:    name,
		proc:    p.spawn(t, name, bin, args...),
		base:    fmt.Sprintf("https://%s:%d", p.podIP, wardlePort),
		certDir: certDir,
		admin:   admin,
	}
}

const nowhereKubeconfig = `apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster:
    server: https://127.0.0.1:1
    insecure-skip-tls-verify: true
users:
- name: nobody
  user: {}
contexts:
- name: nowhere
  context:
    cluster: nowhere
    user: nobody
current-context: nowhere
`

// waitReady waits for the serving certificate wardle generates, then for /readyz.
func (w *wardle) waitReady(t *testing.T) {
	t.Helper()
	waitFor(t, w.name+" to be ready", 60*time.Second, func() error {
		if !w.proc.running() {
			t.Fatalf("%s exited early: %s", w.name, w.proc.exit())
		}
		if w.client == nil {
			c, err := w.newClient()
			if err != nil {
				return err
			}
			w.client = c
		}
		return w.getOK(t.Context(), "/readyz?verbose")
	})
}

// newClient trusts the CA of the serving certificate wardle generated (for the names
// localhost and 127.0.0.1, hence the server name), as an APIService's caBundle would.
func (w *wardle) newClient() (*http.Client, error) {
	chain, err := os.ReadFile(filepath.Join(w.certDir, "apiserver.crt"))
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(chain) {
		return nil, fmt.Errorf("no certificate in %s yet", w.certDir)
	}
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{
			RootCAs:      roots,
			ServerName:   "localhost",
			Certificates: []tls.Certificate{w.admin},
		},
		// One connection, many streams, as the kube-aggregator talks to it.
		ForceAttemptHTTP2: true,
	}}, nil
}

type flunder struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              struct {
		Reference string `json:"reference,omitempty"`
	} `json:"spec"`
}

type flunderList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []flunder `json:"items"`
}

func newFlunder(name string) flunder {
	f := flunder{TypeMeta: metav1.TypeMeta{APIVersion: "wardle.example.com/v1alpha1", Kind: "Flunder"}}
	f.Name = name
	return f
}

// do sends one request (body as JSON) with a bounded time, decodes a 2xx answer into out
// and returns the status code; an error status comes with its Status message.
func (w *wardle) do(ctx context.Context, method, path string, body, out any) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, w.base+path, rd)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, err
	}
	if resp.StatusCode/100 != 2 {
		var s metav1.Status
		if json.Unmarshal(b, &s) == nil && s.Message != "" {
			return resp.StatusCode, fmt.Errorf("%s %s: %s (%s)", method, path, s.Message, s.Reason)
		}
		return resp.StatusCode, fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: %v: %s", method, path, err, b)
		}
	}
	return resp.StatusCode, nil
}

// get is a GET of a plain-text path (the health checks).
// getOK is nil when GET path answers 200, else an error with the status and body.
func (w *wardle) getOK(ctx context.Context, path string) error {
	body, code, err := w.get(ctx, path)
	if err != nil {
		return err
	}
	if code != http.StatusOK {
		return fmt.Errorf("%s: %d\n%s", path, code, body)
	}
	return nil
}

func (w *wardle) get(ctx context.Context, path string) (string, int, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.base+path, nil)
	if err != nil {
		return "", 0, err
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), resp.StatusCode, err
}

func (w *wardle) create(t *testing.T, name string) flunder {
	t.Helper()
	var f flunder
	if code, err := w.do(t.Context(), http.MethodPost, flundersPath, newFlunder(name), &f); err != nil || code != http.StatusCreated {
		t.Fatalf("%s: create %s: %d %v", w.name, name, code, err)
	}
	return f
}

func (w *wardle) delete(t *testing.T, name string) {
	t.Helper()
	if code, err := w.do(t.Context(), http.MethodDelete, flundersPath+"/"+name, nil, nil); err != nil || code != http.StatusOK {
		t.Fatalf("%s: delete %s: %d %v", w.name, name, code, err)
	}
}

func (w *wardle) list(t *testing.T) flunderList {
	t.Helper()
	var l flunderList
	if code, err := w.do(t.Context(), http.MethodGet, flundersPath, nil, &l); err != nil || code != http.StatusOK {
		t.Fatalf("%s: list: %d %v", w.name, code, err)
	}
	return l
}

// names lists the flunders' names, sorted.
func (w *wardle) names(t *testing.T) []string {
	t.Helper()
	var names []string
	for _, f := range w.list(t).Items {
		names = append(names, f.Name)
	}
	slices.Sort(names)
	return names
}

// watchEvent is one event of a watch stream; the object stays raw because an ERROR
// event carries a Status, not a Flunder.
type watchEvent struct {
	Type   string          `json:"type"`
	Object json.RawMessage `json:"object"`
}

func (e watchEvent) flunder(t *testing.T) flunder {
	t.Helper()
	if e.Type == "ERROR" {
		t.Fatalf("watch error event: %s", e.Object)
	}
	var f flunder
	if err := json.Unmarshal(e.Object, &f); err != nil {
		t.Fatalf("watch event %s: %v: %s", e.Type, err, e.Object)
	}
	return f
}

// watchStream is one HTTP watch: its events as they arrive, and why it ended.
type watchStream struct {
	events chan watchEvent
	// end is set (before events is closed) to why the stream ended.
	end error
}

// watch opens a watch on the flunders with the query's options; it ends with the test.
func (w *wardle) watch(t *testing.T, query string) *watchStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.base+flundersPath+"?watch=true&"+query, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := w.client.Do(req)
	if err != nil {
		t.Fatalf("%s: watch %s: %v", w.name, query, err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Fatalf("%s: watch %s: %s: %s", w.name, query, resp.Status, b)
	}
	s := &watchStream{events: make(chan watchEvent, 100)}
	go func() {
		defer resp.Body.Close()
		defer close(s.events)
		dec := json.NewDecoder(resp.Body)
		for {
			var ev watchEvent
			if err := dec.Decode(&ev); err != nil {
				s.end = err
				return
			}
			select {
			case s.events <- ev:
			case <-ctx.Done():
				s.end = ctx.Err()
				return
			}
		}
	}()
	return s
}

// next is the next event within timeout; the test fails if the stream ends or stays
// silent.
func (s *watchStream) next(t *testing.T, timeout time.Duration) watchEvent {
	t.Helper()
	select {
	case ev, ok := <-s.events:
		if !ok {
			t.Fatalf("the watch stream ended: %v", s.end)
		}
		return ev
	case <-time.After(timeout):
		t.Fatalf("no watch event within %v", timeout)
	}
	return watchEvent{}
}

// expectAdded waits for f's ADDED event, past bookmarks.
func (s *watchStream) expectAdded(t *testing.T, f flunder, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ev := s.next(t, time.Until(deadline))
		if ev.Type == "BOOKMARK" {
			continue
		}
		got := ev.flunder(t)
		if ev.Type != "ADDED" || got.Name != f.Name || got.ResourceVersion != f.ResourceVersion {
			t.Fatalf("want ADDED %s@%s, got %s %s@%s", f.Name, f.ResourceVersion, ev.Type, got.Name, got.ResourceVersion)
		}
		return
	}
}

// testCA signs the client certificates wardle accepts (--client-ca-file).
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "etcd-shim e2e client CA"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// clientCert is a client certificate for the user cn in groups: Kubernetes reads the
// user from the common name and the groups from the organizations.
func (ca *testCA) clientCert(t *testing.T, cn string, groups ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(t),
		Subject:      pkix.Name{CommonName: cn, Organization: groups},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func serial(t *testing.T) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n
}
