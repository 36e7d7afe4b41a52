{{/*
Names, labels, the image and the accelerator resource name.
*/}}

{{- define "zayaserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The base name of every resource, and the RayService's own name: at most 47 characters, because
KubeRay appends 6 to name its RayClusters and they must still fit "-serve-svc" in 63.
*/}}
{{- define "zayaserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "zayaserve.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "zayaserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels selecting this release's pods (plus a component label, see below). */}}
{{- define "zayaserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zayaserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "zayaserve.labels" -}}
helm.sh/chart: {{ include "zayaserve.chart" . }}
{{ include "zayaserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The labels of one component's pods: head, attention, experts or redis. KubeRay keeps the pod
template's labels on the pods it creates (adding its own ray.io/* ones), so Services, PDBs,
NetworkPolicies and monitors select Ray pods by these; the RayCluster's own name, which KubeRay
generates anew for each cluster it builds, is never needed.
Call: include "zayaserve.componentLabels" (list $ "attention")
*/}}
{{- define "zayaserve.componentLabels" -}}
{{ include "zayaserve.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The Ray resource each worker group advertises and its Serve deployment asks for. */}}
{{- define "zayaserve.rayResourceName" -}}
{{- printf "zayaserve_%s" . -}}
{{- end -}}

{{/* amd.com/gpu, nvidia.com/gpu, or "" with gpu.vendor none. */}}
{{- define "zayaserve.gpuResource" -}}
{{- $byVendor := dict "amd" "amd.com/gpu" "nvidia" "nvidia.com/gpu" "none" "" -}}
{{- get $byVendor .Values.gpu.vendor -}}
{{- end -}}

{{/* image.tag, else <appVersion>-rocm / -cuda / -cpu following gpu.vendor. */}}
{{- define "zayaserve.image" -}}
{{- $suffix := get (dict "amd" "rocm" "nvidia" "cuda" "none" "cpu") .Values.gpu.vendor -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $suffix) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "zayaserve.redis.fullname" -}}
{{- printf "%s-redis" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The redis:// URL of the L2 cache, "" when there is none. */}}
{{- define "zayaserve.redis.url" -}}
{{- if eq .Values.redis.mode "bundled" -}}
{{- printf "redis://%s:6379/0" (include "zayaserve.redis.fullname" .) -}}
{{- else if eq .Values.redis.mode "external" -}}
{{- required "redis.mode is external: set redis.url (redis://host:6379/0 or rediss://...)" .Values.redis.url -}}
{{- else -}}
{{- dig "engine" "kv_cache_redis_url" "" .Values.serve -}}
{{- end -}}
{{- end -}}

{{/* The Secrets' names and keys (an existing Secret, or the one the chart makes). */}}
{{- define "zayaserve.kvCacheSecret.name" -}}
{{- .Values.secrets.kvCache.existingSecret | default (printf "%s-kv-cache" (include "zayaserve.fullname" .)) -}}
{{- end -}}

{{- define "zayaserve.kvCacheSecret.key" -}}
{{- if .Values.secrets.kvCache.existingSecret -}}{{ .Values.secrets.kvCache.existingSecretKey | default "secret" }}{{- else -}}secret{{- end -}}
{{- end -}}

{{- define "zayaserve.apiKeysSecret.name" -}}
{{- .Values.secrets.apiKeys.existingSecret | default (printf "%s-api-keys" (include "zayaserve.fullname" .)) -}}
{{- end -}}

{{- define "zayaserve.apiKeysSecret.key" -}}
{{- if .Values.secrets.apiKeys.existingSecret -}}{{ .Values.secrets.apiKeys.existingSecretKey | default "api-keys" }}{{- else -}}api-keys{{- end -}}
{{- end -}}

{{- define "zayaserve.rpcTokenSecret.name" -}}
{{- .Values.secrets.rpcToken.existingSecret | default (printf "%s-rpc-token" (include "zayaserve.fullname" .)) -}}
{{- end -}}

{{- define "zayaserve.rpcTokenSecret.key" -}}
{{- if .Values.secrets.rpcToken.existingSecret -}}{{ .Values.secrets.rpcToken.existingSecretKey | default "token" }}{{- else -}}token{{- end -}}
{{- end -}}

{{- define "zayaserve.adminKeySecret.name" -}}
{{- .Values.secrets.adminKey.existingSecret | default (printf "%s-admin-key" (include "zayaserve.fullname" .)) -}}
{{- end -}}

{{- define "zayaserve.adminKeySecret.key" -}}
{{- if .Values.secrets.adminKey.existingSecret -}}{{ .Values.secrets.adminKey.existingSecretKey | default "admin-key" }}{{- else -}}admin-key{{- end -}}
{{- end -}}

{{/* "true" when a Redis password reaches the attention pods: the bundled Redis with AUTH on,
or an external one with auth.existingSecret; else "". */}}
{{- define "zayaserve.redisAuth.enabled" -}}
{{- $auth := .Values.redis.auth -}}
{{- if and $auth.enabled (or (eq .Values.redis.mode "bundled") (and (eq .Values.redis.mode "external") $auth.existingSecret)) -}}true{{- end -}}
{{- end -}}

{{- define "zayaserve.redisAuthSecret.name" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis-auth" (include "zayaserve.fullname" .)) -}}
{{- end -}}

{{- define "zayaserve.redisAuthSecret.key" -}}
{{- if .Values.redis.auth.existingSecret -}}{{ .Values.redis.auth.existingSecretKey | default "password" }}{{- else -}}password{{- end -}}
{{- end -}}

{{/* Where the API keys file is mounted; api_key_file is this folder plus the Secret's key. */}}
{{- define "zayaserve.apiKeysDir" -}}/etc/zayaserve/api-keys{{- end -}}

{{/*
A Secret value generated once: the one already in the cluster (lookup) when there is one, so
an upgrade keeps it; else a new random one. `helm template` cannot look up, so it shows a new
value each time. Call: include "zayaserve.generatedSecret" (list $ "<secret name>" "<key>")
*/}}
{{- define "zayaserve.generatedSecret" -}}
{{- $ctx := index . 0 -}}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace (index . 1) -}}
{{- if and $existing (hasKey ($existing.data | default dict) (index . 2)) -}}
{{- index $existing.data (index . 2) | b64dec -}}
{{- else -}}
{{- randAlphaNum 64 -}}
{{- end -}}
{{- end -}}

{{/* The NetworkPolicy peer "any Ray pod of this release" (of every RayCluster KubeRay builds
for it): Ray's raylets, object managers, agents and actors call each other between every pair
of nodes. */}}
{{- define "zayaserve.rayPeers" -}}
- podSelector:
    matchLabels:
      {{- include "zayaserve.selectorLabels" . | nindent 6 }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values: [head, attention, experts]
{{- end -}}


{{/* The NetworkPolicy peer "this release's pods of one group".
Call: include "zayaserve.groupPeer" (list $ "attention") */}}
{{- define "zayaserve.groupPeer" -}}
- podSelector:
    matchLabels:
      {{- include "zayaserve.componentLabels" . | nindent 6 }}
{{- end -}}
