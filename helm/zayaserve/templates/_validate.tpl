{{/*
Checks across values that the JSON schema cannot express. Each failure names the values to
change; rayservice.yaml runs them all, so `helm lint`, `template` and `install` stop on them.
*/}}
{{- define "zayaserve.validate" -}}
{{- $v := .Values -}}

{{- range $name := list "attention" "experts" }}
{{- $g := get $v $name }}
{{- if or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "%s: need minReplicas (%v) <= replicas (%v) <= maxReplicas (%v)" $name $g.minReplicas $g.replicas $g.maxReplicas) }}
{{- end }}
{{- end }}

{{- /* Replicas asking for GPUs must fit on the group's pods, or they stay pending forever. */}}
{{- range $pair := list (list "attention" "attention_num_gpus" "attention_workers") (list "experts" "expert_num_gpus" "expert_shards") }}
{{- $g := get $v (index $pair 0) }}
{{- $perReplica := include "zayaserve.numGpus" (list $ (index $pair 0) (index $pair 1)) | float64 }}
{{- if gt $perReplica 0.0 }}
{{- $podGpus := ternary 0 (int $g.gpusPerPod) (eq $v.gpu.vendor "none") }}
{{- if eq $podGpus 0 }}
{{- fail (printf "serve.%s is %v but %s pods have no GPU (gpu.vendor %s, %s.gpusPerPod %v)" (index $pair 1) $perReplica (index $pair 0) $v.gpu.vendor (index $pair 0) $g.gpusPerPod) }}
{{- end }}
{{- $perPod := floor (divf $podGpus $perReplica) | int }}
{{- $wanted := int (get $v.serve (index $pair 2) | default 0) }}
{{- if gt $wanted (mul $perPod (int $g.maxReplicas)) }}
{{- fail (printf "serve.%s (%d) needs more GPUs than %s.maxReplicas (%v) pods x %v GPUs hold at %v per replica" (index $pair 2) $wanted (index $pair 0) $g.maxReplicas $podGpus $perReplica) }}
{{- end }}
{{- end }}
{{- end }}

{{- if ne $v.model.source "image" }}
{{- if not (hasPrefix "/" $v.model.path) }}
{{- fail (printf "model.path must be an absolute path with model.source %s, got %q" $v.model.source $v.model.path) }}
{{- end }}
{{- if eq (dir $v.model.path) "/" }}
{{- fail (printf "model.path %q: the checkpoint folder must sit in a folder of its own (e.g. /models/zaya1-8b), which is mounted" $v.model.path) }}
{{- end }}
{{- end }}

{{- if and (ne $v.redis.mode "none") (dig "engine" "kv_cache_redis_url" "" $v.serve) }}
{{- fail (printf "serve.engine.kv_cache_redis_url is set by the chart with redis.mode %s: set redis.url (mode external) instead" $v.redis.mode) }}
{{- end }}

{{- with $v.secrets.apiKeys }}
{{- if and .enabled (not .existingSecret) (not .keys) }}
{{- fail "secrets.apiKeys.enabled: set secrets.apiKeys.existingSecret or secrets.apiKeys.keys" }}
{{- end }}
{{- end }}

{{- with $v.networkPolicy.expertRayPorts }}
{{- if .pinned }}
{{- $lo := int .shardPortRange.min }}
{{- $hi := int .shardPortRange.max }}
{{- if or (gt $lo $hi) (gt (int .minWorkerPort) (int .maxWorkerPort)) }}
{{- fail "networkPolicy.expertRayPorts: need shardPortRange.min <= max and minWorkerPort <= maxWorkerPort" }}
{{- end }}
{{- range $key := list "nodeManager" "objectManager" "dashboardAgentGrpc" "runtimeEnvAgent" "minWorkerPort" "maxWorkerPort" }}
{{- $port := int (get $v.networkPolicy.expertRayPorts $key) }}
{{- if and (ge $port $lo) (le $port $hi) }}
{{- fail (printf "networkPolicy.expertRayPorts.%s (%d) lies in shardPortRange [%d, %d], which only attention pods may reach" $key $port $lo $hi) }}
{{- end }}
{{- end }}
{{- if and (le (int .minWorkerPort) $lo) (ge (int .maxWorkerPort) $hi) }}
{{- fail "networkPolicy.expertRayPorts: the worker port range covers shardPortRange" }}
{{- end }}
{{- end }}
{{- end }}

{{- if eq $v.upgradeStrategy.type "NewClusterWithIncrementalUpgrade" }}
{{- if not $v.rayAutoscaler.enabled }}
{{- fail "upgradeStrategy NewClusterWithIncrementalUpgrade needs rayAutoscaler.enabled (KubeRay refuses it otherwise)" }}
{{- end }}
{{- if not (dig "clusterUpgradeOptions" "gatewayClassName" "" $v.upgradeStrategy) }}
{{- fail "upgradeStrategy NewClusterWithIncrementalUpgrade needs upgradeStrategy.clusterUpgradeOptions.gatewayClassName" }}
{{- end }}
{{- end }}
{{- end -}}
