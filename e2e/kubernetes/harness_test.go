// Harness for the Kubernetes tests: a real etcd, and for runs through the shim a real
// broker beside it and a real shim inside a pod (a network namespace whose loopback the
// shim serves on, reached from the root namespace over a veth pair). It mirrors the Rust
// end-to-end harness (e2e/src), and takes its pod slots from the same lock files, so both
// suites can run at once.
package kubernetes

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Settings of a run, from the environment the runner (scripts/kubernetes) sets.
var (
	// etcdDir holds the etcd binary of the version under test.
	etcdDir = os.Getenv("ETCD_SHIM_TEST_ETCD_DIR")
	// etcdMinor is that version's minor release ("3.5"), for flags that were renamed.
	etcdMinor = envOr("ETCD_SHIM_TEST_ETCD", "3.6")
	// binDir holds etcd-shim and etcd-shim-broker.
	binDir = os.Getenv("ETCD_SHIM_BIN_DIR")
	// viaShim: the store under test talks to a shim in a pod; otherwise to etcd itself,
	// the control run.
	viaShim = envOr("KUBE_STORAGE_VIA", "shim") == "shim"
)

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

const (
	tenantToken = "kubernetes-e2e-token"
	tenant      = "kube-e2e/apiserver"
	// tenantPrefix is where the broker keeps the tenant's keys in etcd.
	tenantPrefix = "/etcd-shim/tenants/" + tenant + "/"
)

// tenantCred is a tenant the brokers know: the token its shims present and the
// <namespace>/<serviceaccount> it stands for.
type tenantCred struct {
	token, name string
}

// defaultTenant is the one tenant of the storage tests.
var defaultTenant = tenantCred{token: tenantToken, name: tenant}

// prefix is where the broker keeps the tenant's keys in etcd.
func (c tenantCred) prefix() string { return "/etcd-shim/tenants/" + c.name + "/" }

// proc is a child process killed when the test ends; its log is printed if the test
// failed.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func spawn(t testing.TB, name string, dir string, program string, args ...string) *proc {
	t.Helper()
	log := filepath.Join(dir, name+".log")
	f, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(program, args...)
	cmd.Stdout, cmd.Stderr = f, f
	// Its own process group, so a stop reaches what `ip netns exec` starts.
	// No Pdeathsig: Go ends it with the thread that forked, not with the process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: log, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			p.printTail(t)
		}
	})
	return p
}

// exit describes how the process ended, for messages.
func (p *proc) exit() string {
	<-p.done
	return p.cmd.ProcessState.String()
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM, as an operator (or the kubelet) would, and waits for the exit.
func (p *proc) stop() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.kill()
	}
}

func (p *proc) kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

func (p *proc) printTail(t testing.TB) {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	t.Logf("----- last lines of %s -----\n%s", p.name, strings.Join(lines, "\n"))
}

// waitFor polls f until it succeeds or timeout passes.
func waitFor(t testing.TB, what string, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	pause := 10 * time.Millisecond
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s: %v", timeout, what, err)
		}
		time.Sleep(pause)
		pause = min(pause*2, 200*time.Millisecond)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// httpOK answers nil when GET url answers 200, dialling with dial.
func httpOK(dial func(ctx context.Context, network, addr string) (net.Conn, error), url string) error {
	c := http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: dial}}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}

var plainDial = (&net.Dialer{}).DialContext

// etcdProcess is a single-member etcd on loopback with its data in memory.
type etcdProcess struct {
	url string
	*proc
}

type etcdOptions struct {
	// progressNotify is etcd's watch progress notification interval (0: etcd's default).
	progressNotify time.Duration
}

func startEtcd(t testing.TB, o etcdOptions) *etcdProcess {
	t.Helper()
	if etcdDir == "" {
		t.Fatal("ETCD_SHIM_TEST_ETCD_DIR is not set: run the tests with scripts/kubernetes")
	}
	dir := memDir(t)
	// A free port can be taken by another test's process between freePort and etcd's
	// bind (many runs share the machine): etcd then exits at once, and gets new ports.
	for attempt := 1; ; attempt++ {
		client, peer := freePort(t), freePort(t)
		url := fmt.Sprintf("http://127.0.0.1:%d", client)
		peerURL := fmt.Sprintf("http://127.0.0.1:%d", peer)
		args := []string{
			"--name", "k8s", "--data-dir", filepath.Join(dir, fmt.Sprintf("data-%d", attempt)),
			"--listen-client-urls", url, "--advertise-client-urls", url,
			"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
			"--initial-cluster", "k8s=" + peerURL,
			"--unsafe-no-fsync", "--logger", "zap", "--log-level", "warn",
		}
		if o.progressNotify > 0 {
			// Renamed in 3.6; 3.5 knows only the experimental name.
			flag := "--watch-progress-notify-interval"
			if etcdMinor == "3.5" {
				flag = "--experimental-watch-progress-notify-interval"
			}
			args = append(args, flag+"="+o.progressNotify.String())
		}
		p := spawn(t, fmt.Sprintf("etcd-%d", attempt), dir, filepath.Join(etcdDir, "etcd"), args...)
		deadline := time.Now().Add(20 * time.Second)
		for p.running() && httpOK(plainDial, url+"/health") != nil && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if p.running() {
			waitFor(t, "etcd to serve", time.Second, func() error {
				return httpOK(plainDial, url+"/health")
			})
			return &etcdProcess{url: url, proc: p}
		}
		if log, _ := os.ReadFile(p.log); attempt < 5 && strings.Contains(string(log), "address already in use") {
			continue
		}
		t.Fatalf("etcd exited early: %s", p.exit())
	}
}

// memDir is a temporary directory on tmpfs where the machine has one: the tests are about
// what etcd answers, not its durability.
func memDir(t testing.TB) string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if d, err := os.MkdirTemp("/dev/shm", "k8s-e2e-"); err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			return d
		}
	}
	return t.TempDir()
}

// broker is an etcd-shim broker in the root namespace, on every address so that pods
// reach it over their veth; its admin port (metrics, readiness) is on loopback.
type broker struct {
	port  int
	admin int
	*proc
}

// startBroker starts a broker on etcdURL that knows tenants (defaultTenant when none is
// given) by their static tokens.
func startBroker(t testing.TB, etcdURL string, tenants ...tenantCred) *broker {
	t.Helper()
	if len(tenants) == 0 {
		tenants = []tenantCred{defaultTenant}
	}
	dir := t.TempDir()
	var lines strings.Builder
	for _, c := range tenants {
		fmt.Fprintf(&lines, "%s %s\n", c.token, c.name)
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.WriteFile(tokens, []byte(lines.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	// Replicas of one etcd translate lease IDs alike only with one secret, as the
	// chart's Secret gives them.
	secret := filepath.Join(dir, "lease-id-secret")
	if err := os.WriteFile(secret, []byte("lease ids of "+etcdURL+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	port, admin := freePort(t), freePort(t)
	p := spawn(t, "broker", dir, filepath.Join(binDir, "etcd-shim-broker"),
		"--listen", fmt.Sprintf("0.0.0.0:%d", port),
		"--admin-listen", fmt.Sprintf("127.0.0.1:%d", admin),
		"--etcd-endpoints", etcdURL,
		"--static-tokens-file", tokens,
		"--lease-id-secret-file", secret)
	waitFor(t, "broker to be ready", 20*time.Second, func() error {
		if !p.running() {
			t.Fatalf("broker exited early: %s", p.exit())
		}
		return httpOK(plainDial, fmt.Sprintf("http://127.0.0.1:%d/ready", admin))
	})
	return &broker{port: port, admin: admin, proc: p}
}

// metric is the sum of a broker's samples of the metric name (all label sets), from its
// Prometheus text on the admin port.
func (b *broker) metric(name string) (float64, error) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", b.admin))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("broker metrics: %s", resp.Status)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	var sum float64
	found := false
	for _, line := range strings.Split(string(body), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 2 || strings.HasPrefix(line, "#") {
			continue
		}
		series := fields[0]
		if series != name && !strings.HasPrefix(series, name+"{") {
			continue
		}
		v, err := strconv.ParseFloat(fields[1], 64)
		if err != nil {
			return 0, fmt.Errorf("broker metric %q: %v", line, err)
		}
		sum += v
		found = true
	}
	if !found {
		return 0, fmt.Errorf("broker has no metric %s", name)
	}
	return sum, nil
}

// pod is a network namespace with loopback up and a veth pair to the root namespace.
type pod struct {
	name   string
	hostIP string
	podIP  string
	dir    string
	shim   *proc
}

const podSlots = 200

// startPod takes the first free slot. Slots are file locks shared with the Rust harness,
// so concurrent test processes never pick the same namespace or subnet, and a crashed
// test's slot is reused (its leftover namespace deleted first).
func startPod(t testing.TB) *pod {
	t.Helper()
	lockDir := filepath.Join(os.TempDir(), "etcd-shim-e2e-slots")
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for slot := 1; slot <= podSlots; slot++ {
		f, err := os.OpenFile(filepath.Join(lockDir, fmt.Sprintf("%d.lock", slot)), os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
			f.Close()
			continue
		}
		p := createPod(t, slot)
		t.Cleanup(func() {
			_ = exec.Command("ip", "netns", "del", p.name).Run()
			f.Close()
		})
		return p
	}
	t.Fatalf("all %d pod slots are taken", podSlots)
	return nil
}

func createPod(t testing.TB, slot int) *pod {
	name := fmt.Sprintf("esh%d", slot)
	hostIf, podIf := name+"h", name+"p"
	_ = exec.Command("ip", "netns", "del", name).Run()
	_ = exec.Command("ip", "link", "del", hostIf).Run()
	hi, lo := slot>>6, (slot&63)<<2
	p := &pod{
		name:   name,
		hostIP: fmt.Sprintf("10.213.%d.%d", hi, lo+1),
		podIP:  fmt.Sprintf("10.213.%d.%d", hi, lo+2),
		dir:    t.TempDir(),
	}
	steps := [][]string{
		{"netns", "add", name},
		{"link", "add", hostIf, "type", "veth", "peer", "name", podIf},
		{"link", "set", podIf, "netns", name},
		{"addr", "add", p.hostIP + "/30", "dev", hostIf},
		{"link", "set", hostIf, "up"},
		{"netns", "exec", name, "ip", "addr", "add", p.podIP + "/30", "dev", podIf},
		{"netns", "exec", name, "ip", "link", "set", podIf, "up"},
		{"netns", "exec", name, "ip", "link", "set", "lo", "up"},
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	return p
}

// command is a program run inside the pod.
func (p *pod) command(program string, args ...string) (string, []string) {
	return "ip", append([]string{"netns", "exec", p.name, program}, args...)
}

// spawn starts a program inside the pod.
func (p *pod) spawn(t testing.TB, name, program string, args ...string) *proc {
	prog, all := p.command(program, args...)
	return spawn(t, name, p.dir, prog, all...)
}

// dial opens a TCP connection from inside the pod: the socket is created in the pod's
// network namespace, so 127.0.0.1 is the pod's loopback, as for a container in it.
func (p *pod) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	// The thread is switched into the pod for the socket() call and back before it runs
	// anything else.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	home, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, err
	}
	defer home.Close()
	ns, err := os.Open("/var/run/netns/" + p.name)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("entering pod %s: %w", p.name, err)
	}
	var d net.Dialer
	c, dialErr := d.DialContext(ctx, network, addr)
	if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
		// A thread left in the pod must not run anything else: keep it locked so the
		// runtime ends it with this goroutine.
		runtime.LockOSThread()
		if c != nil {
			c.Close()
		}
		return nil, fmt.Errorf("leaving pod %s: %w", p.name, err)
	}
	return c, dialErr
}

// startShim starts the shim on the pod's 127.0.0.1:2379, pointed at brokers, and waits
// until it is ready.
func (p *pod) startShim(t testing.TB, brokers ...*broker) {
	t.Helper()
	p.startShimAs(t, defaultTenant, brokers...)
}

// startShimAs is startShim for the pod of another tenant, with that tenant's token.
func (p *pod) startShimAs(t testing.TB, c tenantCred, brokers ...*broker) {
	t.Helper()
	token := filepath.Join(p.dir, "token")
	if err := os.WriteFile(token, []byte(c.token), 0o600); err != nil {
		t.Fatal(err)
	}
	var urls []string
	for _, b := range brokers {
		urls = append(urls, fmt.Sprintf("http://%s:%d", p.hostIP, b.port))
	}
	p.shim = p.spawn(t, "shim", filepath.Join(binDir, "etcd-shim"),
		"--listen", "127.0.0.1:2379", "--admin-listen", "127.0.0.1:9379",
		"--broker", strings.Join(urls, ","), "--broker-insecure-plaintext",
		"--token-file", token)
	waitFor(t, "shim to be ready", 20*time.Second, func() error {
		if !p.shim.running() {
			t.Fatalf("shim exited early: %s", p.shim.exit())
		}
		return httpOK(p.dial, "http://127.0.0.1:9379/ready")
	})
}

// backend is what a test's store talks to: a shim in a pod, or etcd itself.
type backend struct {
	// endpoint is the etcd URL the store dials.
	endpoint string
	// dial opens its connections (inside the pod for the shim).
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// etcd is the real etcd behind it, for what a cluster admin would look at.
	etcd *etcdProcess
}

// newBackend starts a stack of its own for one test, as Kubernetes' own tests start an
// etcd of their own for each: etcd, and through the shim a broker and a pod.
func newBackend(t testing.TB, o etcdOptions) *backend {
	t.Helper()
	e := startEtcd(t, o)
	if !viaShim {
		return &backend{endpoint: e.url, dial: plainDial, etcd: e}
	}
	b := startBroker(t, e.url)
	p := startPod(t)
	p.startShim(t, b)
	return &backend{endpoint: "http://127.0.0.1:2379", dial: p.dial, etcd: e}
}
