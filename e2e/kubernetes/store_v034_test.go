//go:build apiserver034

// What differs in k8s.io/apiserver v0.34 (Kubernetes 1.34): the store's constructor and
// the size-estimate hook.
package kubernetes

import (
	"context"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/etcd3"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
	"k8s.io/apiserver/pkg/storage/value"
)

func newStore(t *testing.T, c *kubernetes.Client, compactor etcd3.Compactor, codec runtime.Codec, prefix, resourcePrefix string,
	gr schema.GroupResource, transformer value.Transformer, leases etcd3.LeaseManagerConfig, decoder etcd3.Decoder, versioner storage.Versioner) storage.Interface {
	s := etcd3.New(c, compactor, codec, newPod, newPodList, prefix, resourcePrefix, gr, transformer, leases, decoder, versioner)
	t.Cleanup(s.Close)
	return s
}

func (e *env) increaseRV() storagetesting.IncreaseRVFunc {
	return func(ctx context.Context, t *testing.T) { e.putIncreaseRV(ctx, t) }
}

// cacherPrefix is the watch cache's resource prefix: its key function adds the "/" itself.
const cacherPrefix = "/pods"

func newKVRecorder(kv clientv3.KV, _ *storagetesting.KubernetesRecorder) *storagetesting.KVRecorder {
	return storagetesting.NewKVRecorder(kv)
}

// reads counts the store's list calls to etcd.
func (e *env) reads() uint64 {
	return e.kv.GetReadsAndReset()
}

func enableSizeEstimate(_ *testing.T, e *env, on bool) {
	if on {
		e.store.SetKeysFunc(e.keys)
	}
}

func TestList(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestList(e.ctx, t, e.store, e.compact(), false, e.lists)
}

func TestConsistentList(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestConsistentList(e.ctx, t, e.store, e.increaseRV(), false, true, false)
}

func TestWatch(t *testing.T) {
	watchTests(t)
	watchSemanticsTests(t)
}
