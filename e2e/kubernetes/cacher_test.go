// The watch cache (k8s.io/apiserver/pkg/storage/cacher) on top of the etcd3 store, as every
// apiserver runs it: the cacher's own storage conformance tests that concern etcd (its
// watches, consistent reads and lists), on the same per-test etcd as the store's tests.
// Compaction tests are left to the store: the cacher's versions wait on the watch cache's
// internals; so is the cluster-scoped watch, which needs a cacher keyed without namespaces.
package kubernetes

import (
	"context"
	"testing"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/apis/example"
	"k8s.io/apiserver/pkg/features"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/cacher"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/utils/clock"
)

// podAttrs are the labels and selectable fields of a pod, as the cacher tests filter.
func podAttrs(obj runtime.Object) (labels.Set, fields.Set, error) {
	pod := obj.(*example.Pod)
	return labels.Set(pod.Labels), fields.Set{
		"metadata.name":      pod.Name,
		"metadata.namespace": pod.Namespace,
		"spec.nodeName":      pod.Spec.NodeName,
	}, nil
}

// setupCacher puts a watch cache on a test's store and waits until it is ready.
func setupCacher(t *testing.T, o setupOptions) (*env, storage.Interface) {
	t.Helper()
	e := setup(t, o)
	c, err := cacher.NewCacherFromConfig(cacher.Config{
		Storage:             e.store,
		Versioner:           storage.APIObjectVersioner{},
		GroupResource:       schema.GroupResource{Resource: "pods"},
		EventsHistoryWindow: cacher.DefaultEventFreshDuration,
		ResourcePrefix:      cacherPrefix,
		KeyFunc:             func(obj runtime.Object) (string, error) { return storage.NamespaceKeyFunc(cacherPrefix, obj) },
		GetAttrsFunc:        podAttrs,
		NewFunc:             newPod,
		NewListFunc:         newPodList,
		Codec:               e.codec,
		Clock:               clock.RealClock{},
	})
	if err != nil {
		t.Fatalf("starting the watch cache: %v", err)
	}
	if err := c.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	d := cacher.NewCacheDelegator(c, e.store)
	t.Cleanup(func() {
		d.Stop()
		c.Stop()
	})
	return e, d
}

func TestCacher(t *testing.T) {
	run := func(name string, o setupOptions, f func(e *env, s storage.Interface, t *testing.T)) {
		t.Run(name, func(t *testing.T) {
			e, s := setupCacher(t, o)
			f(e, s, t)
		})
	}
	plain := setupOptions{}
	run("Create", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestCreate(e.ctx, t, s, e.checkStorageInvariants())
	})
	run("Get", plain, func(e *env, s storage.Interface, t *testing.T) { storagetesting.RunTestGet(e.ctx, t, s) })
	run("ListPaging", plain, func(e *env, s storage.Interface, t *testing.T) { storagetesting.RunTestListPaging(e.ctx, t, s) })
	run("ConsistentList", plain, func(e *env, s storage.Interface, t *testing.T) {
		fromSnapshot := utilfeature.DefaultFeatureGate.Enabled(features.ListFromCacheSnapshot)
		storagetesting.RunTestConsistentList(e.ctx, t, s, e.increaseRV(), true, true, fromSnapshot)
	})
	run("GetListNonRecursive", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestGetListNonRecursive(e.ctx, t, e.increaseRV(), s)
	})
	run("NamespaceScopedList", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestNamespaceScopedList(e.ctx, t, s)
	})
	run("GuaranteedUpdateWithConflict", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestGuaranteedUpdateWithConflict(e.ctx, t, s)
	})
	run("Watch", plain, func(e *env, s storage.Interface, t *testing.T) { storagetesting.RunTestWatch(e.ctx, t, s) })
	run("DeleteTriggerWatch", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestDeleteTriggerWatch(e.ctx, t, s)
	})
	run("WatchFromNonZero", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestWatchFromNonZero(e.ctx, t, s)
	})
	run("DelayedWatchDelivery", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestDelayedWatchDelivery(e.ctx, t, s)
	})
	run("WatcherTimeout", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestWatcherTimeout(e.ctx, t, s)
	})
	run("WatchDeleteEventObjectHaveLatestRV", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestWatchDeleteEventObjectHaveLatestRV(e.ctx, t, s)
	})
	run("WatchInitializationSignal", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestWatchInitializationSignal(e.ctx, t, s)
	})
	run("NamespaceScopedWatch", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestNamespaceScopedWatch(e.ctx, t, s)
	})
	run("WatchDispatchBookmarkEvents", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestWatchDispatchBookmarkEvents(e.ctx, t, s, true)
	})
	run("OptionalWatchBookmarksWithCorrectResourceVersion", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunTestOptionalWatchBookmarksWithCorrectResourceVersion(e.ctx, t, s)
	})
	run("WatchSemantics", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunWatchSemantics(e.ctx, t, s)
	})
	run("WatchSemanticInitialEventsExtended", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunWatchSemanticInitialEventsExtended(e.ctx, t, s)
	})
	run("WatchListMatchSingle", plain, func(e *env, s storage.Interface, t *testing.T) {
		storagetesting.RunWatchListMatchSingle(e.ctx, t, s)
	})
}
