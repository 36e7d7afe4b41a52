{{/*
The Serve config (serveConfigV2): Ray Serve's settings and one application whose args are
zayaserve's ClusterConfig. `serve:` is copied as it is, then the chart adds what it owns. No
secret ever goes in here (Serve shows its config): secrets reach the containers as env and
mounted files.
*/}}

{{/* GPUs per replica of a group: serve.<field> if set, else 1 on a GPU group, else 0.
Call: include "zayaserve.numGpus" (list $ "attention" "attention_num_gpus") */}}
{{- define "zayaserve.numGpus" -}}
{{- $ctx := index . 0 -}}
{{- $group := get $ctx.Values (index . 1) -}}
{{- $field := index . 2 -}}
{{- if hasKey $ctx.Values.serve $field -}}
{{- get $ctx.Values.serve $field -}}
{{- else if and (ne $ctx.Values.gpu.vendor "none") (gt (int $group.gpusPerPod) 0) -}}
1
{{- else -}}
0
{{- end -}}
{{- end -}}

{{- define "zayaserve.serveArgs" -}}
{{- $args := deepCopy .Values.serve -}}
{{- $_ := set $args "model" .Values.model.path -}}
{{- $_ := set $args "attention_num_gpus" (include "zayaserve.numGpus" (list . "attention" "attention_num_gpus") | float64) -}}
{{- $_ := set $args "expert_num_gpus" (include "zayaserve.numGpus" (list . "experts" "expert_num_gpus") | float64) -}}
{{- /* Each deployment asks for one unit of its group's Ray resource: placement, not a limit
     (a group advertises 1000 per pod; GPUs and CPUs bound how many replicas fit). */ -}}
{{- $_ := set $args "attention_ray_resources" (dict (include "zayaserve.rayResourceName" "attention") 1) -}}
{{- $_ := set $args "expert_ray_resources" (dict (include "zayaserve.rayResourceName" "experts") 1) -}}
{{- $_ := set $args "ingress_ray_resources" (dict (include "zayaserve.rayResourceName" "head") 1) -}}
{{- if .Values.secrets.apiKeys.enabled -}}
{{- $_ := set $args "api_key_file" (printf "%s/%s" (include "zayaserve.apiKeysDir" .) (include "zayaserve.apiKeysSecret.key" .)) -}}
{{- end -}}
{{- $url := include "zayaserve.redis.url" . -}}
{{- if $url -}}
{{- $engine := get $args "engine" | default dict -}}
{{- $_ := set $engine "kv_cache_redis_url" $url -}}
{{- $_ := set $args "engine" $engine -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{- define "zayaserve.serveConfig" -}}
{{- $logging := dict "log_level" .Values.rayServe.logLevel "enable_access_log" .Values.rayServe.enableAccessLog -}}
{{- $app := dict "name" "zayaserve" "route_prefix" "/" "import_path" "zayaserve.cluster.app:build_app" -}}
{{- $_ := set $app "logging_config" $logging -}}
{{- $_ := set $app "args" (include "zayaserve.serveArgs" . | fromYaml) -}}
{{- $config := dict "proxy_location" .Values.rayServe.proxyLocation "logging_config" $logging -}}
{{- /* Serve's HTTP proxy binds every address of the pod, on the port ClusterConfig names. */ -}}
{{- $_ := set $config "http_options" (dict "host" "0.0.0.0" "port" (.Values.serve.http_port | default 8000)) -}}
{{- $_ := set $config "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The most expert shards one expert pod can hold: Ray places one where its CPUs
(serve.replica_num_cpus, ClusterConfig's default 0.1) and GPUs (serve.expert_num_gpus) fit, so
the smaller of the pod's CPUs and GPUs over a shard's; at least 1. */}}
{{- define "zayaserve.expertShardsPerPod" -}}
{{- $cpu := toString .Values.experts.resources.cpu -}}
{{- $cpus := ternary (divf (trimSuffix "m" $cpu | float64) 1000) ($cpu | float64) (hasSuffix "m" $cpu) -}}
{{- $perPod := floor (divf $cpus (.Values.serve.replica_num_cpus | default 0.1 | float64)) | int -}}
{{- $perShard := include "zayaserve.numGpus" (list . "experts" "expert_num_gpus") | float64 -}}
{{- if gt $perShard 0.0 -}}
{{- $perPod = min $perPod (floor (divf (int .Values.experts.gpusPerPod) $perShard) | int) -}}
{{- end -}}
{{- max $perPod 1 -}}
{{- end -}}

{{/* Expert pods a drain may take without losing an expert: each expert has
serve.expert_replication copies on distinct shards, and one pod may hold every one of them up
to its shards per pod, so floor((replication - 1) / shards per pod). */}}
{{- define "zayaserve.expertSafeUnavailable" -}}
{{- $replication := .Values.serve.expert_replication | default 1 | int -}}
{{- div (sub $replication 1) (include "zayaserve.expertShardsPerPod" . | int) -}}
{{- end -}}
