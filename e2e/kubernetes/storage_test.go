// Kubernetes' own storage conformance tests (k8s.io/apiserver/pkg/storage/testing) on
// the etcd3 store of k8s.io/apiserver, the storage every aggregated apiserver uses. Each
// test gets an etcd of its own, as in Kubernetes' own etcd3 package tests; with
// KUBE_STORAGE_VIA=shim the store reaches it through a shim in a pod and a broker, with
// KUBE_STORAGE_VIA=direct it talks to etcd itself (the control run).
//
// The test functions carry the names of the etcd3 package's own tests that call the same
// Run* functions, so a result here compares with Kubernetes' own CI.
package kubernetes

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"k8s.io/apimachinery/pkg/api/apitesting"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apiserver/pkg/apis/example"
	examplev1 "k8s.io/apiserver/pkg/apis/example/v1"
	"k8s.io/apiserver/pkg/features"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/etcd3"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
	"k8s.io/apiserver/pkg/storage/value"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	featuregatetesting "k8s.io/component-base/featuregate/testing"
	"k8s.io/utils/clock"
)

var (
	scheme = runtime.NewScheme()
	codecs = serializer.NewCodecFactory(scheme)
)

func init() {
	metav1.AddToGroupVersion(scheme, metav1.SchemeGroupVersion)
	utilruntime.Must(example.AddToScheme(scheme))
	utilruntime.Must(examplev1.AddToScheme(scheme))
}

// valuePrefix marks values written through the test transformer, as in Kubernetes' tests.
const valuePrefix = "test!"

// env is one test's store and what the checks around it need.
type env struct {
	ctx   context.Context
	store *swappableStore
	// client is the store's own etcd client (with Kubernetes' call recorders), so checks
	// see what the apiserver sees: through the shim, the tenant's own keys.
	client  *kubernetes.Client
	kv      *storagetesting.KVRecorder
	lists   *storagetesting.KubernetesRecorder
	backend *backend
	codec   runtime.Codec
}

type setupOptions struct {
	etcd etcdOptions
}

func setup(t *testing.T, o setupOptions) *env {
	t.Helper()
	b := newBackend(t, o.etcd)
	via := "etcd itself"
	if viaShim {
		via = "a shim in a pod"
	}
	t.Logf("%s the store talks to %s (etcd %s)", "conformance unit:", via, etcdMinor)
	client, err := kubernetes.New(clientv3.Config{
		Endpoints:   []string{b.endpoint},
		DialTimeout: 10 * time.Second,
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return b.dial(ctx, "tcp", addr)
		})},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	lists := storagetesting.NewKubernetesRecorder(client.Kubernetes)
	kv := newKVRecorder(client.KV, lists)
	client.KV, client.Kubernetes = kv, lists

	codec := apitesting.TestCodec(codecs, examplev1.SchemeGroupVersion)
	transformer := &swapTransformer{current: storagetesting.NewPrefixTransformer([]byte(valuePrefix), false)}
	versioner := storage.APIObjectVersioner{}
	compactor := etcd3.NewCompactor(client.Client, 0, clock.RealClock{}, nil)
	t.Cleanup(compactor.Stop)
	leases := etcd3.NewDefaultLeaseManagerConfig()
	// Kubernetes' tests wait at most 30 s at a time, so leases are reused for 1 s.
	leases.ReuseDurationSeconds = 1
	s := newStore(t, client, compactor, codec, "", "/pods/", schema.GroupResource{Resource: "pods"},
		transformer, leases, etcd3.NewDefaultDecoder(codec, versioner), versioner)
	return &env{
		ctx:     context.Background(),
		store:   &swappableStore{Interface: s, transformer: transformer},
		client:  client,
		kv:      kv,
		lists:   lists,
		backend: b,
		codec:   codec,
	}
}

func newPod() runtime.Object     { return &example.Pod{} }
func newPodList() runtime.Object { return &example.PodList{} }

// swapTransformer lets a test replace the store's value transformer while it runs, as
// Kubernetes' tests do by reaching into the store.
type swapTransformer struct {
	mu      sync.RWMutex
	current value.Transformer
}

func (s *swapTransformer) get() value.Transformer {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.current
}

func (s *swapTransformer) set(t value.Transformer) {
	s.mu.Lock()
	s.current = t
	s.mu.Unlock()
}

func (s *swapTransformer) TransformFromStorage(ctx context.Context, data []byte, dataCtx value.Context) ([]byte, bool, error) {
	return s.get().TransformFromStorage(ctx, data, dataCtx)
}

func (s *swapTransformer) TransformToStorage(ctx context.Context, data []byte, dataCtx value.Context) ([]byte, error) {
	return s.get().TransformToStorage(ctx, data, dataCtx)
}

// swappableStore is the store with the transformer hooks the storage tests ask for.
type swappableStore struct {
	storage.Interface
	transformer *swapTransformer
}

func (s *swappableStore) prefixTransformer() *storagetesting.PrefixTransformer {
	for tr := s.transformer.get(); ; {
		if p, ok := tr.(*storagetesting.PrefixTransformer); ok {
			return p
		}
		panic(fmt.Sprintf("transformer is %T, not the test's prefix transformer", tr))
	}
}

func (s *swappableStore) UpdatePrefixTransformer(modifier storagetesting.PrefixTransformerModifier) func() {
	orig := s.transformer.get()
	copied := *s.prefixTransformer()
	s.transformer.set(modifier(&copied))
	return func() { s.transformer.set(orig) }
}

// checkStorageInvariants reads what the store wrote, as Kubernetes' tests do: a
// transformed value that decodes to the object without resourceVersion or selfLink.
func (e *env) checkStorageInvariants() storagetesting.KeyValidation {
	return func(ctx context.Context, t *testing.T, key string) {
		resp, err := e.client.KV.Get(ctx, key)
		if err != nil {
			t.Fatalf("etcd get %s: %v", key, err)
		}
		if len(resp.Kvs) == 0 {
			t.Fatalf("expecting non empty result on key: %s", key)
		}
		v := resp.Kvs[0].Value
		if !bytes.HasPrefix(v, []byte(valuePrefix)) {
			t.Fatalf("stored value of %s lacks the transformer's prefix: %q", key, v)
		}
		decoded, err := runtime.Decode(e.codec, v[len(valuePrefix):])
		if err != nil {
			t.Fatalf("decoding %s: %v", key, err)
		}
		obj := decoded.(*example.Pod)
		if obj.ResourceVersion != "" {
			t.Errorf("stored object should have empty resource version")
		}
		if obj.SelfLink != "" {
			t.Errorf("stored output should have empty selfLink")
		}
	}
}

// putIncreaseRV moves the revision on with a write outside the store's keys.
func (e *env) putIncreaseRV(ctx context.Context, t *testing.T) int64 {
	resp, err := e.client.KV.Put(ctx, "increaseRV", "ok")
	if err != nil {
		t.Fatalf("Could not update increaseRV: %v", err)
	}
	return resp.Header.Revision
}

// compact compacts as the apiserver's own compactor does, through the store's client,
// then waits until the store has seen it where it watches for compactions.
func (e *env) compact() storagetesting.Compaction {
	return func(ctx context.Context, t *testing.T, resourceVersion string) {
		rv, err := storage.APIObjectVersioner{}.ParseResourceVersion(resourceVersion)
		if err != nil {
			t.Fatal(err)
		}
		var current int64
		current, _, _, err = etcd3.Compact(ctx, e.client.Client, current, int64(rv))
		if err != nil {
			_, _, _, err = etcd3.Compact(ctx, e.client.Client, current, int64(rv))
		}
		if err != nil {
			t.Fatal(err)
		}
		if utilfeature.DefaultFeatureGate.Enabled(features.ListFromCacheSnapshot) {
			deadline := time.Now().Add(30 * time.Second)
			for e.store.CompactRevision() != int64(rv) {
				if time.Now().After(deadline) {
					t.Fatalf("the store did not observe compaction at %d (it has %d)", rv, e.store.CompactRevision())
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
}

// checkCalls counts the store's reads, as Kubernetes' pagination tests do: objects
// decoded, and calls made to etcd for the page sizes the store should grow to.
func (e *env) checkCalls() storagetesting.CallsValidation {
	return func(t *testing.T, pageSize, estimatedProcessedObjects uint64) {
		if reads := e.store.prefixTransformer().GetReadsAndReset(); reads != estimatedProcessedObjects {
			t.Errorf("unexpected reads: %d, expected: %d", reads, estimatedProcessedObjects)
		}
		estimatedGetCalls := uint64(1)
		if pageSize != 0 {
			// The store doubles the page size while pages come back short.
			const maxLimit = 10000
			currLimit := pageSize
			for sum := uint64(1); sum < estimatedProcessedObjects; {
				currLimit = min(currLimit*2, maxLimit)
				sum += currLimit
				estimatedGetCalls++
			}
		}
		if reads := e.reads(); reads != estimatedGetCalls {
			t.Fatalf("unexpected reads: %d, want: %d", reads, estimatedGetCalls)
		}
	}
}

// keys lists the keys of the store's resource, for the size-based list cost estimate.
func (e *env) keys(ctx context.Context) ([]string, error) {
	resp, err := e.client.KV.Get(ctx, "/pods/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, err
	}
	keys := make([]string, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		keys = append(keys, string(kv.Key))
	}
	return keys, nil
}

func TestCreate(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestCreate(e.ctx, t, e.store, e.checkStorageInvariants())
}

func TestCreateWithTTL(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestCreateWithTTL(e.ctx, t, e.store)
}

func TestCreateWithKeyExist(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestCreateWithKeyExist(e.ctx, t, e.store)
}

func TestGet(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestGet(e.ctx, t, e.store)
}

func TestUnconditionalDelete(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestUnconditionalDelete(e.ctx, t, e.store)
}

func TestConditionalDelete(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestConditionalDelete(e.ctx, t, e.store)
}

func TestDeleteWithSuggestion(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestDeleteWithSuggestion(e.ctx, t, e.store)
}

func TestDeleteWithSuggestionAndConflict(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestDeleteWithSuggestionAndConflict(e.ctx, t, e.store)
}

func TestDeleteWithSuggestionOfDeletedObject(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestDeleteWithSuggestionOfDeletedObject(e.ctx, t, e.store)
}

func TestValidateDeletionWithSuggestion(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestValidateDeletionWithSuggestion(e.ctx, t, e.store)
}

func TestValidateDeletionWithOnlySuggestionValid(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestValidateDeletionWithOnlySuggestionValid(e.ctx, t, e.store)
}

func TestDeleteWithConflict(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestDeleteWithConflict(e.ctx, t, e.store)
}

func TestPreconditionalDeleteWithSuggestion(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestPreconditionalDeleteWithSuggestion(e.ctx, t, e.store)
}

func TestPreconditionalDeleteWithSuggestionPass(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestPreconditionalDeleteWithOnlySuggestionPass(e.ctx, t, e.store)
}

func TestListPaging(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestListPaging(e.ctx, t, e.store)
}

func TestGetListNonRecursive(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestGetListNonRecursive(e.ctx, t, e.increaseRV(), e.store)
}

func TestGetListRecursivePrefix(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestGetListRecursivePrefix(e.ctx, t, e.store)
}

func TestGuaranteedUpdate(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestGuaranteedUpdate(e.ctx, t, e.store, e.checkStorageInvariants())
}

func TestGuaranteedUpdateWithTTL(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestGuaranteedUpdateWithTTL(e.ctx, t, e.store)
}

func TestGuaranteedUpdateChecksStoredData(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestGuaranteedUpdateChecksStoredData(e.ctx, t, e.store)
}

func TestGuaranteedUpdateWithConflict(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestGuaranteedUpdateWithConflict(e.ctx, t, e.store)
}

func TestGuaranteedUpdateWithSuggestionAndConflict(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestGuaranteedUpdateWithSuggestionAndConflict(e.ctx, t, e.store)
}

func TestTransformationFailure(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestTransformationFailure(e.ctx, t, e.store)
}

func TestCompactRevision(t *testing.T) {
	// The store sees compactions made elsewhere only through its watch on the compact
	// key, which ListFromCacheSnapshot turns on.
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.ListFromCacheSnapshot, true)
	e := setup(t, setupOptions{})
	storagetesting.RunTestCompactRevision(e.ctx, t, e.store, e.increaseRV(), e.compact())
}

func TestListContinuation(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestListContinuation(e.ctx, t, e.store, e.checkCalls())
}

func TestListPaginationRareObject(t *testing.T) {
	// As in Kubernetes' own test: ListFromCacheSnapshot reads the compact key once more,
	// which the call count does not expect.
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.ListFromCacheSnapshot, false)
	e := setup(t, setupOptions{})
	storagetesting.RunTestListPaginationRareObject(e.ctx, t, e.store, e.checkCalls())
}

func TestListContinuationWithFilter(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestListContinuationWithFilter(e.ctx, t, e.store, e.checkCalls())
}

func TestNamespaceScopedList(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestNamespaceScopedList(e.ctx, t, e.store)
}

func TestListInconsistentContinuation(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestListInconsistentContinuation(e.ctx, t, e.store, e.compact())
}

func TestListResourceVersionMatch(t *testing.T) {
	e := setup(t, setupOptions{})
	storagetesting.RunTestListResourceVersionMatch(e.ctx, t, e.store)
}

func TestStats(t *testing.T) {
	for _, sizeBased := range []bool{true, false} {
		t.Run(fmt.Sprintf("SizeBasedListCostEstimate=%v", sizeBased), func(t *testing.T) {
			e := setup(t, setupOptions{})
			enableSizeEstimate(t, e, sizeBased)
			storagetesting.RunTestStats(e.ctx, t, e.store, e.codec, e.store.transformer, sizeBased)
		})
	}
}

// progressEtcd is an etcd that sends watch progress notifications every second, for the
// tests of progress notifications and bookmarks.
var progressEtcd = setupOptions{etcd: etcdOptions{progressNotify: time.Second}}

// watchTests are the watch tests of the etcd3 package (TestWatch) that both apiserver
// versions share.
func watchTests(t *testing.T) {
	run := func(name string, o setupOptions, f func(e *env, t *testing.T)) {
		t.Run(name, func(t *testing.T) { f(setup(t, o), t) })
	}
	plain := setupOptions{}
	run("Watch", plain, func(e *env, t *testing.T) { storagetesting.RunTestWatch(e.ctx, t, e.store) })
	run("ClusterScopedWatch", plain, func(e *env, t *testing.T) { storagetesting.RunTestClusterScopedWatch(e.ctx, t, e.store) })
	run("NamespaceScopedWatch", plain, func(e *env, t *testing.T) { storagetesting.RunTestNamespaceScopedWatch(e.ctx, t, e.store) })
	run("DeleteTriggerWatch", plain, func(e *env, t *testing.T) { storagetesting.RunTestDeleteTriggerWatch(e.ctx, t, e.store) })
	run("WatchFromZero", plain, func(e *env, t *testing.T) { storagetesting.RunTestWatchFromZero(e.ctx, t, e.store, e.compact()) })
	run("WatchFromNonZero", plain, func(e *env, t *testing.T) { storagetesting.RunTestWatchFromNonZero(e.ctx, t, e.store) })
	run("DelayedWatchDelivery", plain, func(e *env, t *testing.T) { storagetesting.RunTestDelayedWatchDelivery(e.ctx, t, e.store) })
	run("WatchError", plain, func(e *env, t *testing.T) { storagetesting.RunTestWatchError(e.ctx, t, e.store) })
	run("WatchContextCancel", plain, func(e *env, t *testing.T) { storagetesting.RunTestWatchContextCancel(e.ctx, t, e.store) })
	run("WatcherTimeout", plain, func(e *env, t *testing.T) { storagetesting.RunTestWatcherTimeout(e.ctx, t, e.store) })
	run("WatchDeleteEventObjectHaveLatestRV", plain, func(e *env, t *testing.T) {
		storagetesting.RunTestWatchDeleteEventObjectHaveLatestRV(e.ctx, t, e.store)
	})
	run("WatchInitializationSignal", plain, func(e *env, t *testing.T) {
		storagetesting.RunTestWatchInitializationSignal(e.ctx, t, e.store)
	})
	run("ProgressNotify", progressEtcd, func(e *env, t *testing.T) {
		storagetesting.RunOptionalTestProgressNotify(e.ctx, t, e.store, e.increaseRV())
	})
	run("WatchDispatchBookmarkEvents", progressEtcd, func(e *env, t *testing.T) {
		storagetesting.RunTestWatchDispatchBookmarkEvents(e.ctx, t, e.store, false)
	})
	run("SendInitialEventsBackwardCompatibility", plain, func(e *env, t *testing.T) {
		storagetesting.RunSendInitialEventsBackwardCompatibility(e.ctx, t, e.store)
	})
	run("WatchErrorEventIsBlockingFurtherEvent", plain, func(e *env, t *testing.T) {
		storagetesting.RunWatchErrorIsBlockingFurtherEvents(e.ctx, t, e.store)
	})
}

// watchSemanticsTests are the WatchList and initial-events tests, run once per setting of
// the list path where the apiserver version has more than one.
func watchSemanticsTests(t *testing.T) {
	run := func(name string, f func(e *env, t *testing.T)) {
		t.Run(name, func(t *testing.T) { f(setup(t, setupOptions{}), t) })
	}
	run("WatchSemantics", func(e *env, t *testing.T) { storagetesting.RunWatchSemantics(e.ctx, t, e.store) })
	run("WatchSemanticsWithConcurrentDecode", func(e *env, t *testing.T) {
		featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.ConcurrentWatchObjectDecode, true)
		storagetesting.RunWatchSemantics(e.ctx, t, e.store)
	})
	run("WatchSemanticInitialEventsExtended", func(e *env, t *testing.T) {
		storagetesting.RunWatchSemanticInitialEventsExtended(e.ctx, t, e.store)
	})
	run("WatchListMatchSingle", func(e *env, t *testing.T) { storagetesting.RunWatchListMatchSingle(e.ctx, t, e.store) })
}
