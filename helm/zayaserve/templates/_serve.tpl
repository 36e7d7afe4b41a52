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
