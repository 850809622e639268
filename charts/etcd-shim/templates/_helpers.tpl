{{/*
Names, labels and the settings several templates must agree on. Anything two objects
must say identically (a Secret name, a port, a path) is defined here once.
*/}}

{{- define "etcd-shim.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name prefix of every object; 40 characters leave room for component suffixes within the 52 characters of a CronJob name. */}}
{{- define "etcd-shim.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "etcd-shim.brokerName" -}}{{ include "etcd-shim.fullname" . }}-broker{{- end -}}
{{- define "etcd-shim.injectorName" -}}{{ include "etcd-shim.fullname" . }}-injector{{- end -}}
{{- define "etcd-shim.webhookCertsName" -}}{{ include "etcd-shim.fullname" . }}-webhook-certs{{- end -}}
{{/* The injector's serving certificate, written by webhook-certs. */}}
{{- define "etcd-shim.injectorTlsSecret" -}}{{ include "etcd-shim.fullname" . }}-injector-tls{{- end -}}
{{/* Cluster-scoped: the release namespace is not part of the name, so two releases in
     different namespaces need different release names or fullnameOverride. */}}
{{- define "etcd-shim.webhookName" -}}{{ include "etcd-shim.fullname" . }}-injector{{- end -}}

{{- define "etcd-shim.brokerServiceAccount" -}}
{{- if .Values.broker.serviceAccount.create -}}
{{- default (include "etcd-shim.brokerName" .) .Values.broker.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.broker.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "etcd-shim.injectorServiceAccount" -}}
{{- if .Values.injector.serviceAccount.create -}}
{{- default (include "etcd-shim.injectorName" .) .Values.injector.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.injector.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Labels. `etcd-shim.io/component` is on every pod the chart creates and is what the
webhook's objectSelector excludes, so the project's own pods never get a shim (and can
be created while no injector runs).
*/}}
{{- define "etcd-shim.baseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: etcd-shim
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of objects that belong to no one component. */}}
{{- define "etcd-shim.labels" -}}
{{ include "etcd-shim.baseLabels" . }}
app.kubernetes.io/name: {{ include "etcd-shim.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "root" $ "component" "broker"). */}}
{{- define "etcd-shim.selectorLabels" -}}
app.kubernetes.io/name: {{ include "etcd-shim.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
etcd-shim.io/component: {{ .component }}
{{- end -}}

{{- define "etcd-shim.componentLabels" -}}
{{ include "etcd-shim.baseLabels" .root }}
{{ include "etcd-shim.selectorLabels" . }}
{{- end -}}

{{/* Image reference; call with (dict "root" $ "image" .Values.broker.image). */}}
{{- define "etcd-shim.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Ports: what the binaries listen on, their probes and Services all come from here.
*/}}
{{- define "etcd-shim.brokerGrpcPort" -}}2379{{- end -}}
{{- define "etcd-shim.brokerAdminPort" -}}9380{{- end -}}
{{- define "etcd-shim.injectorWebhookPort" -}}8443{{- end -}}
{{- define "etcd-shim.injectorAdminPort" -}}9381{{- end -}}

{{/* The audience of the shim's projected token; fixed in the injector. */}}
{{- define "etcd-shim.tokenAudience" -}}etcd-shim{{- end -}}

{{/* Mount paths inside the broker and injector containers. */}}
{{- define "etcd-shim.brokerConfigDir" -}}/etc/etcd-shim/config{{- end -}}
{{- define "etcd-shim.etcdClientDir" -}}/etc/etcd-shim/etcd-client{{- end -}}
{{- define "etcd-shim.brokerTlsDir" -}}/etc/etcd-shim/tls{{- end -}}
{{- define "etcd-shim.leaseIdDir" -}}/etc/etcd-shim/lease-ids{{- end -}}
{{/* The Secret with the lease ID secret: the operator's, or the one the chart makes. */}}
{{- define "etcd-shim.leaseIdSecretName" -}}
{{- .Values.broker.leaseIdSecret.existingSecret | default (printf "%s-lease-ids" (include "etcd-shim.brokerName" .)) -}}
{{- end -}}
{{- define "etcd-shim.injectorTlsDir" -}}/etc/etcd-shim/tls{{- end -}}

{{/* "true" unless the operator set the dangerous plaintext value. */}}
{{- define "etcd-shim.brokerTls" -}}
{{- if not .Values.broker.tls.dangerouslyDisable -}}true{{- end -}}
{{- end -}}

{{/* The URL shims use to reach the broker; https exactly when the broker serves TLS. */}}
{{- define "etcd-shim.brokerUrl" -}}
{{- printf "%s://%s.%s.svc:%v" (ternary "https" "http" (eq (include "etcd-shim.brokerTls" .) "true")) (include "etcd-shim.brokerName" .) .Release.Namespace .Values.broker.service.grpcPort -}}
{{- end -}}

{{/* The broker's serving Secret (tls.crt, tls.key, ca.crt). */}}
{{- define "etcd-shim.brokerTlsSecret" -}}
{{- default (printf "%s-broker-tls" (include "etcd-shim.fullname" .)) .Values.broker.tls.secretName -}}
{{- end -}}

{{/* The ConfigMap with the broker's CA bundle in every opted-in namespace. */}}
{{- define "etcd-shim.brokerCaConfigMap" -}}
{{- default (printf "%s-broker-ca" (include "etcd-shim.fullname" .)) .Values.broker.tls.caConfigMapName -}}
{{- end -}}

{{- define "etcd-shim.brokerCertsName" -}}{{ include "etcd-shim.fullname" . }}-broker-certs{{- end -}}

{{/* The namespace label that opts in; fixed in the injector. */}}
{{- define "etcd-shim.injectLabel" -}}etcd-shim.io/inject{{- end -}}

{{/* Namespace of the `helm test` pod. */}}
{{- define "etcd-shim.testNamespace" -}}
{{- default (printf "%s-test" .Release.Namespace) .Values.tests.namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "etcd-shim.testName" -}}{{ include "etcd-shim.fullname" . }}-test{{- end -}}

{{/*
The broker config file: the values' `broker.config`. The `default` backend comes from the
broker's flags (`etcd.endpoints` and the mounted client certificate) unless the values
define one.
*/}}
{{- define "etcd-shim.brokerConfig" -}}
{{- $config := deepCopy .Values.broker.config -}}
{{- if .Values.tests.enabled -}}
{{- /* The `helm test` pod's service account is admitted like any tenant, first so that no
     operator rule denies it. */ -}}
{{- $rule := dict "namespace" (include "etcd-shim.testNamespace" .) "serviceAccount" (include "etcd-shim.testName" .) -}}
{{- $_ := set $config "tenants" (prepend (default (list) $config.tenants) $rule) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Pod securityContext shared by all of the chart's pods. */}}
{{/* Pod securityContext shared by all of the chart's pods; the ids are left out when
     podIds sets them to null (OpenShift assigns them). */}}
{{- define "etcd-shim.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podIds.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.podIds.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
{{- with .Values.podIds.fsGroup }}
fsGroup: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "etcd-shim.containerSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podIds.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.podIds.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
topologySpreadConstraints with the component's labelSelector filled in where missing;
call with (dict "root" $ "component" "broker" "constraints" .Values.broker.topologySpreadConstraints).
*/}}
{{- define "etcd-shim.topologySpread" -}}
{{- $selector := include "etcd-shim.selectorLabels" (dict "root" .root "component" .component) | fromYaml -}}
{{- range .constraints }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $selector) }}
{{- if not (hasKey $c "matchLabelKeys") }}
{{- $_ := set $c "matchLabelKeys" (list "pod-template-hash") }}
{{- end }}
{{- end }}
- {{ toYaml $c | nindent 2 | trim }}
{{- end }}
{{- end -}}

{{/* Environment shared by the webhook-certs Jobs and CronJob. */}}
{{- define "etcd-shim.webhookCertsEnv" -}}
- name: ETCD_SHIM_WEBHOOK_CERTS_NAMESPACE
  value: {{ .Release.Namespace | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_SERVICE
  value: {{ include "etcd-shim.injectorName" . | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_CLUSTER_DOMAIN
  value: {{ .Values.clusterDomain | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_SECRET
  value: {{ include "etcd-shim.injectorTlsSecret" . | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_WEBHOOK
  value: {{ include "etcd-shim.webhookName" . | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_CA_VALIDITY
  value: {{ .Values.webhookCerts.caValidity | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_SERVING_VALIDITY
  value: {{ .Values.webhookCerts.servingValidity | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_RENEW_FRACTION
  value: {{ .Values.webhookCerts.renewFraction | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_CA_OVERLAP
  value: {{ .Values.webhookCerts.caOverlap | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_LOG_FORMAT
  value: {{ .Values.webhookCerts.logFormat | quote }}
- name: ETCD_SHIM_WEBHOOK_CERTS_LOG_LEVEL
  value: {{ .Values.webhookCerts.logLevel | quote }}
{{- end -}}

{{/*
Pod spec of a webhook-certs run; call with (dict "root" $ "serviceAccount" NAME
"skipMissingWebhook" BOOL "restartPolicy" "OnFailure").
*/}}
{{- define "etcd-shim.webhookCertsPod" -}}
{{- $v := .root.Values.webhookCerts -}}
serviceAccountName: {{ .serviceAccount }}
automountServiceAccountToken: true
restartPolicy: {{ .restartPolicy }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  {{- include "etcd-shim.podSecurityContext" .root | nindent 2 }}
containers:
  - name: webhook-certs
    image: {{ include "etcd-shim.image" (dict "root" .root "image" $v.image) }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    {{- if .skipMissingWebhook }}
    args:
      - --skip-missing-webhook
    {{- end }}
    env:
      {{- include "etcd-shim.webhookCertsEnv" .root | nindent 6 }}
    resources:
      {{- toYaml $v.resources | nindent 6 }}
    securityContext:
      {{- include "etcd-shim.containerSecurityContext" .root | nindent 6 }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The broker's command line, one quoted flag per item. Paths point into the volumes of
templates/broker/deployment.yaml.
*/}}
{{- define "etcd-shim.brokerArgs" -}}
{{- $b := .Values.broker -}}
- {{ print "--listen=0.0.0.0:" (include "etcd-shim.brokerGrpcPort" .) | quote }}
- {{ print "--admin-listen=0.0.0.0:" (include "etcd-shim.brokerAdminPort" .) | quote }}
- {{ print "--etcd-endpoints=" (join "," .Values.etcd.endpoints) | quote }}
{{- if .Values.etcd.clientSecret.name }}
{{- $dir := include "etcd-shim.etcdClientDir" . }}
- {{ print "--etcd-ca-file=" $dir "/ca.crt" | quote }}
- {{ print "--etcd-cert-file=" $dir "/tls.crt" | quote }}
- {{ print "--etcd-key-file=" $dir "/tls.key" | quote }}
{{- end }}
- {{ print "--config=" (include "etcd-shim.brokerConfigDir" .) "/config.yaml" | quote }}
- {{ print "--reload-interval=" $b.reloadInterval | quote }}
- {{ print "--auth-mode=" $b.auth.mode | quote }}
- {{ print "--token-audience=" (include "etcd-shim.tokenAudience" .) | quote }}
{{- if eq $b.auth.mode "jwks" }}
- {{ print "--issuer=" $b.auth.issuer | quote }}
{{- end }}
{{- if include "etcd-shim.brokerTls" . }}
- {{ print "--tls-cert-file=" (include "etcd-shim.brokerTlsDir" .) "/tls.crt" | quote }}
- {{ print "--tls-key-file=" (include "etcd-shim.brokerTlsDir" .) "/tls.key" | quote }}
{{- end }}
- {{ print "--tenant-prefix-root=" .Values.etcd.tenantPrefixRoot | quote }}
- {{ print "--lease-prefix=" .Values.etcd.leasePrefix | quote }}
- {{ print "--lease-id-secret-file=" (include "etcd-shim.leaseIdDir" .) "/secret" | quote }}
{{- with $b.advertiseClientUrls }}
- {{ print "--advertise-client-urls=" (join "," .) | quote }}
{{- end }}
- {{ print "--drain-timeout=" $b.drainTimeout | quote }}
- {{ print "--worker-threads=" $b.workerThreads | quote }}
{{- /* Each replica enforces its share of the per-replica limits (docs/broker-config.md). */}}
- {{ print "--replicas=" $b.replicaCount | quote }}
- {{ print "--log-format=" $b.logFormat | quote }}
{{- with $b.logLevel }}
- {{ print "--log-level=" . | quote }}
{{- end }}
{{- end -}}

{{/*
The injector's command line. The shim settings become the sidecar's environment.
*/}}
{{- define "etcd-shim.injectorArgs" -}}
{{- $i := .Values.injector -}}
{{- $s := .Values.shim -}}
- {{ print "--listen=0.0.0.0:" (include "etcd-shim.injectorWebhookPort" .) | quote }}
- {{ print "--admin-listen=0.0.0.0:" (include "etcd-shim.injectorAdminPort" .) | quote }}
- {{ print "--tls-cert=" (include "etcd-shim.injectorTlsDir" .) "/tls.crt" | quote }}
- {{ print "--tls-key=" (include "etcd-shim.injectorTlsDir" .) "/tls.key" | quote }}
- {{ print "--shim-image=" (include "etcd-shim.image" (dict "root" . "image" $s.image)) | quote }}
- {{ print "--broker-url=" (include "etcd-shim.brokerUrl" .) | quote }}
- {{ print "--broker-ca-configmap=" (ternary (include "etcd-shim.brokerCaConfigMap" .) "" (eq (include "etcd-shim.brokerTls" .) "true")) | quote }}
- {{ print "--shim-run-as-user=" (.Values.podIds.runAsUser | default "" | toString) | quote }}
- {{ print "--sidecar-mode=" $s.sidecarMode | quote }}
- {{ print "--shim-log-level=" $s.logLevel | quote }}
- {{ print "--shim-log-format=" $s.logFormat | quote }}
- {{ print "--shim-cpu-request=" $s.resources.cpuRequest | quote }}
- {{ print "--shim-memory-request=" $s.resources.memoryRequest | quote }}
- {{ print "--shim-memory-limit=" $s.resources.memoryLimit | quote }}
- {{ print "--max-body-bytes=" (int64 $i.maxBodyBytes) | quote }}
- {{ print "--shutdown-delay=" $i.shutdownDelay | quote }}
- {{ print "--drain-timeout=" $i.drainTimeout | quote }}
- {{ print "--log-format=" $i.logFormat | quote }}
{{- with $i.logLevel }}
- {{ print "--log-level=" . | quote }}
{{- end }}
{{- end -}}

{{/*
webhook-certs RBAC: exactly what docs/webhook-certs.md lists. Call with (dict "root" $
"name" NAME "hook" BOOL); hook objects run before the release's own objects exist.
*/}}
{{- define "etcd-shim.webhookCertsRbac" -}}
{{- $root := .root -}}
{{- $meta := dict "root" $root "hook" .hook -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  {{- include "etcd-shim.webhookCertsMeta" $meta | nindent 2 }}
automountServiceAccountToken: true
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  {{- include "etcd-shim.webhookCertsMeta" $meta | nindent 2 }}
rules:
  - apiGroups: [""]
    resources: ["secrets"]
    resourceNames: [{{ include "etcd-shim.injectorTlsSecret" $root | quote }}]
    verbs: ["get", "update"]
  # RBAC cannot limit create by name: the name is not known when create is authorized.
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  {{- include "etcd-shim.webhookCertsMeta" $meta | nindent 2 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ .name }}
subjects:
  - kind: ServiceAccount
    name: {{ .name }}
    namespace: {{ $root.Release.Namespace }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {{ .name }}
  {{- include "etcd-shim.webhookCertsMeta" $meta | nindent 2 }}
rules:
  - apiGroups: ["admissionregistration.k8s.io"]
    resources: ["mutatingwebhookconfigurations"]
    resourceNames: [{{ include "etcd-shim.webhookName" $root | quote }}]
    verbs: ["get", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ .name }}
  {{- include "etcd-shim.webhookCertsMeta" $meta | nindent 2 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ .name }}
subjects:
  - kind: ServiceAccount
    name: {{ .name }}
    namespace: {{ $root.Release.Namespace }}
{{- end -}}

{{- define "etcd-shim.webhookCertsMeta" -}}
labels:
  {{- include "etcd-shim.componentLabels" (dict "root" .root "component" "webhook-certs") | nindent 2 }}
{{- if .hook }}
annotations:
  helm.sh/hook: pre-install,pre-upgrade
  helm.sh/hook-weight: "-10"
  helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}
{{- end -}}
