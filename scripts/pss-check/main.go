// Command pss-check evaluates every pod template in Kubernetes manifests against the Pod
// Security Standards with the evaluator the API server's PodSecurity admission uses
// (k8s.io/pod-security-admission), so "passes restricted" means what the cluster means.
//
// Usage: pss-check [-level restricted] [-version latest] FILE...
//
// Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs are checked;
// other kinds are skipped. Exit status 1 names every pod that fails and why.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	psaapi "k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
	"sigs.k8s.io/yaml"
)

type podOf struct {
	name string
	meta *metav1.ObjectMeta
	spec *corev1.PodSpec
}

// pods extracts the pod template of one manifest, if its kind has one.
func pods(doc []byte) ([]podOf, error) {
	var head struct {
		Kind     string            `json:"kind"`
		Metadata metav1.ObjectMeta `json:"metadata"`
	}
	if err := yaml.Unmarshal(doc, &head); err != nil {
		return nil, err
	}
	name := head.Kind + " " + head.Metadata.Namespace + "/" + head.Metadata.Name
	one := func(meta *metav1.ObjectMeta, spec *corev1.PodSpec) []podOf {
		return []podOf{{name, meta, spec}}
	}
	switch head.Kind {
	case "Pod":
		var o corev1.Pod
		if err := yaml.UnmarshalStrict(doc, &o); err != nil {
			return nil, err
		}
		return one(&o.ObjectMeta, &o.Spec), nil
	case "Deployment":
		var o appsv1.Deployment
		if err := yaml.UnmarshalStrict(doc, &o); err != nil {
			return nil, err
		}
		return one(&o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec), nil
	case "StatefulSet":
		var o appsv1.StatefulSet
		if err := yaml.UnmarshalStrict(doc, &o); err != nil {
			return nil, err
		}
		return one(&o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec), nil
	case "DaemonSet":
		var o appsv1.DaemonSet
		if err := yaml.UnmarshalStrict(doc, &o); err != nil {
			return nil, err
		}
		return one(&o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec), nil
	case "ReplicaSet":
		var o appsv1.ReplicaSet
		if err := yaml.UnmarshalStrict(doc, &o); err != nil {
			return nil, err
		}
		return one(&o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec), nil
	case "Job":
		var o batchv1.Job
		if err := yaml.UnmarshalStrict(doc, &o); err != nil {
			return nil, err
		}
		return one(&o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec), nil
	case "CronJob":
		var o batchv1.CronJob
		if err := yaml.UnmarshalStrict(doc, &o); err != nil {
			return nil, err
		}
		t := &o.Spec.JobTemplate.Spec.Template
		return one(&t.ObjectMeta, &t.Spec), nil
	}
	return nil, nil
}

func main() {
	level := flag.String("level", "restricted", "Pod Security level: baseline or restricted")
	version := flag.String("version", "latest", "Pod Security version, e.g. v1.30 or latest")
	flag.Parse()
	lvl, err := psaapi.ParseLevel(*level)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pss-check:", err)
		os.Exit(2)
	}
	ver, err := psaapi.ParseVersion(*version)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pss-check:", err)
		os.Exit(2)
	}
	lv := psaapi.LevelVersion{Level: lvl, Version: ver}
	evaluator, err := policy.NewEvaluator(policy.DefaultChecks())
	if err != nil {
		fmt.Fprintln(os.Stderr, "pss-check:", err)
		os.Exit(2)
	}
	checked, failed := 0, 0
	for _, file := range flag.Args() {
		f, err := os.Open(file)
		if err != nil {
			fmt.Fprintln(os.Stderr, "pss-check:", err)
			os.Exit(2)
		}
		reader := utilyaml.NewYAMLReader(bufio.NewReader(f))
		for {
			doc, err := reader.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "pss-check: %s: %v\n", file, err)
				os.Exit(2)
			}
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			found, err := pods(doc)
			if err != nil {
				fmt.Fprintf(os.Stderr, "pss-check: %s: %v\n", file, err)
				os.Exit(2)
			}
			for _, p := range found {
				checked++
				var why []string
				for _, r := range evaluator.EvaluatePod(lv, p.meta, p.spec) {
					if !r.Allowed {
						why = append(why, r.ForbiddenReason+" ("+r.ForbiddenDetail+")")
					}
				}
				if len(why) > 0 {
					failed++
					fmt.Printf("  FAIL %s: %s\n", p.name, strings.Join(why, "; "))
				} else {
					fmt.Printf("  ok   %s passes %s:%s\n", p.name, *level, *version)
				}
			}
		}
		f.Close()
	}
	fmt.Printf("pss-check: %d pods checked, %d fail %s:%s\n", checked, failed, *level, *version)
	if failed > 0 || checked == 0 {
		os.Exit(1)
	}
}
