//go:build !apiserver034

// What differs in k8s.io/apiserver v0.37 (Kubernetes 1.37): the store's constructor, the
// streaming list (RangeStream, on by default) and the tests added since 1.34.
package kubernetes

import (
	"fmt"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/features"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/etcd3"
	etcdfeature "k8s.io/apiserver/pkg/storage/feature"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
	"k8s.io/apiserver/pkg/storage/value"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	featuregatetesting "k8s.io/component-base/featuregate/testing"
)

func newStore(t *testing.T, c *kubernetes.Client, compactor etcd3.Compactor, codec runtime.Codec, prefix, resourcePrefix string,
	gr schema.GroupResource, transformer value.Transformer, leases etcd3.LeaseManagerConfig, decoder etcd3.Decoder, versioner storage.Versioner) storage.Interface {
	s, err := etcd3.New(c, compactor, codec, newPod, newPodList, prefix, resourcePrefix, gr, transformer, leases, decoder, versioner)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// UpdateTransformer is the hook of the corrupt-object tests (InterfaceWithTransformerOverride).
func (s *swappableStore) UpdateTransformer(modifier storagetesting.TransformerModifier) func() {
	orig := s.transformer.get()
	s.transformer.set(modifier(orig))
	return func() { s.transformer.set(orig) }
}

func (e *env) increaseRV() storagetesting.IncreaseRVFunc { return e.putIncreaseRV }

// cacherPrefix is the watch cache's resource prefix: its key function wants the trailing "/".
const cacherPrefix = "/pods/"

func newKVRecorder(kv clientv3.KV, lists *storagetesting.KubernetesRecorder) *storagetesting.KVRecorder {
	return storagetesting.NewKVRecorder(kv, lists)
}

// reads counts the store's list calls to etcd, paged or streamed.
func (e *env) reads() uint64 {
	return e.kv.GetReadsAndReset() + e.kv.GetStreamReadsAndReset()
}

func enableSizeEstimate(t *testing.T, e *env, on bool) {
	if on {
		if err := e.store.EnableResourceSizeEstimation(e.keys); err != nil {
			t.Fatal(err)
		}
	}
}

// withRangeStream runs f with the streaming list on and off, and checks that lists took
// the path asked for: through RangeStream where the etcd behind has it (3.7), and back to
// paged Range where it answers Unimplemented.
func withRangeStream(t *testing.T, f func(t *testing.T) *env) {
	for _, on := range []bool{false, true} {
		t.Run(fmt.Sprintf("rangeStream=%v", on), func(t *testing.T) {
			featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.EtcdRangeStream, on)
			orig := etcdfeature.DefaultFeatureSupportChecker
			etcdfeature.DefaultFeatureSupportChecker = etcdfeature.NewDefaultFeatureSupportChecker()
			t.Cleanup(func() { etcdfeature.DefaultFeatureSupportChecker = orig })
			e := f(t)
			if e == nil {
				return
			}
			streamed := e.kv.GetStreamReadsAndReset()
			if !on && streamed > 0 {
				t.Errorf("expected no RangeStream requests with the feature disabled, got %d", streamed)
			}
			if on && etcdMinor >= "3.7" && streamed == 0 {
				t.Error("expected lists to be served by RangeStream")
			}
		})
	}
}

func TestList(t *testing.T) {
	withRangeStream(t, func(t *testing.T) *env {
		e := setup(t, setupOptions{})
		storagetesting.RunTestList(e.ctx, t, e.store, e.compact(), false, e.lists)
		return e
	})
}

func TestConsistentList(t *testing.T) {
	withRangeStream(t, func(t *testing.T) *env {
		e := setup(t, setupOptions{})
		storagetesting.RunTestConsistentList(e.ctx, t, e.store, e.increaseRV(), false, true, false)
		return e
	})
}

func TestKeySchema(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestKeySchema(e.ctx, t, e.store)
}

func TestDeleteWithSuggestionAndMissingExpectedTransformOrDecodeFailure(t *testing.T) {
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.AllowUnsafeMalformedObjectDeletion, true)
	e := setup(t, setupOptions{})
	storagetesting.RunTestDeleteWithSuggestionAndMissingExpectedTransformOrDecodeError(e.ctx, t, e.store)
}

func TestWatch(t *testing.T) {
	watchTests(t)
	for _, on := range []bool{false, true} {
		t.Run(fmt.Sprintf("RangeStream=%v", on), func(t *testing.T) {
			featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.EtcdRangeStream, on)
			watchSemanticsTests(t)
		})
	}
}
