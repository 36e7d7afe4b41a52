{{/*
The pod templates of the Ray head and the two worker groups. Every Ray container gets the same
image, the model mount, a memory-backed /dev/shm, writable emptyDirs under a read-only root
filesystem and the same security contexts; each secret reaches only the groups that read it.
*/}}

{{/* The model's mount point: the parent folder of model.path (pvc and hostPath only). */}}
{{- define "zayaserve.modelMountPath" -}}
{{- dir .Values.model.path -}}
{{- end -}}

{{/* Where the scratch emptyDirs go (see values: scratch). */}}
{{- define "zayaserve.cacheDir" -}}/home/ray/.cache{{- end -}}

{{/*
The environment of one group's Ray container. Each secret goes only where the code reads it:
- ZAYASERVE_KV_CACHE_SECRET: the attention workers' L2 tier (remote_tier.py), and build_app
  (cluster/app.py), which runs where Serve runs its build task: a task of no resources that the
  Serve controller submits, so Ray keeps it on the controller's node, the head.
- ZAYASERVE_RPC_TOKEN: build_app only (the head); it hands the token to shards and attention
  workers in their bind arguments.
- ZAYASERVE_ADMIN_API_KEY: the ingress (the head).
- ZAYASERVE_REDIS_PASSWORD: the attention workers' Redis client (redis_store.py).
Call: include "zayaserve.rayEnv" (list $ "head")
*/}}
{{- define "zayaserve.rayEnv" -}}
{{- $ctx := index . 0 -}}
{{- $group := index . 1 -}}
{{- $v := $ctx.Values -}}
{{- if and (include "zayaserve.redis.url" $ctx) (has $group (list "head" "attention")) }}
# The L2 prefix cache's HMAC key: one for every worker and rollout.
- name: ZAYASERVE_KV_CACHE_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "zayaserve.kvCacheSecret.name" $ctx }}
      key: {{ include "zayaserve.kvCacheSecret.key" $ctx }}
{{- end }}
{{- if and (include "zayaserve.redisAuth.enabled" $ctx) (eq $group "attention") }}
# The L2 cache's Redis password (redis.auth).
- name: ZAYASERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "zayaserve.redisAuthSecret.name" $ctx }}
      key: {{ include "zayaserve.redisAuthSecret.key" $ctx }}
{{- end }}
{{- if eq $group "head" }}
# The expert shards' RPC token, kept across in-place Serve updates.
- name: ZAYASERVE_RPC_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "zayaserve.rpcTokenSecret.name" $ctx }}
      key: {{ include "zayaserve.rpcTokenSecret.key" $ctx }}
{{- if $v.secrets.adminKey.enabled }}
# The admin key of /v1/cluster/*.
- name: ZAYASERVE_ADMIN_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "zayaserve.adminKeySecret.name" $ctx }}
      key: {{ include "zayaserve.adminKeySecret.key" $ctx }}
{{- end }}
{{- end }}
# Triton's kernel cache in the writable cache folder (the root filesystem is read-only).
- name: TRITON_HOME
  value: {{ include "zayaserve.cacheDir" $ctx }}
- name: TRITON_CACHE_DIR
  value: {{ include "zayaserve.cacheDir" $ctx }}/triton
{{- with $v.tracing }}
{{- if .otlpEndpoint }}
# OpenTelemetry traces: the Serve app (built on the head) and every process's exporter read
# the standard OTEL_* variables.
- name: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
{{- end }}
{{- if .otlpMetricsEndpoint }}
# OpenTelemetry's GenAI server metrics, pushed by the ingress (beside Prometheus' /metrics).
- name: OTEL_EXPORTER_OTLP_METRICS_ENDPOINT
  value: {{ .otlpMetricsEndpoint | quote }}
{{- end }}
{{- with .sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- if and (not (kindIs "invalid" .samplerArg)) (ne (toString .samplerArg) "") }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | toString | quote }}
{{- end }}
{{- with .serviceName }}
- name: OTEL_SERVICE_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Call: include "zayaserve.rayVolumeMounts" (list $ "head") */}}
{{- define "zayaserve.rayVolumeMounts" -}}
{{- $ctx := index . 0 -}}
- name: shm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ include "zayaserve.cacheDir" $ctx }}
{{- if ne $ctx.Values.model.source "image" }}
# Every pod: build_app reads the model's config wherever Serve builds the app.
- name: model
  mountPath: {{ include "zayaserve.modelMountPath" $ctx }}
  readOnly: true
{{- end }}
{{- if and $ctx.Values.secrets.apiKeys.enabled (eq (index . 1) "head") }}
- name: api-keys
  mountPath: {{ include "zayaserve.apiKeysDir" $ctx }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Call: include "zayaserve.rayVolumes" (list $ "head" .shmSize) */}}
{{- define "zayaserve.rayVolumes" -}}
{{- $ctx := index . 0 -}}
{{- $group := index . 1 -}}
{{- $scratch := $ctx.Values.scratch | default dict -}}
# Ray's object store, in /dev/shm (a container runtime's default is 64Mi).
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ index . 2 }}
# What Ray and zayaserve write (the root filesystem is read-only): see values: scratch.
- name: tmp
  emptyDir:
    {{- with $scratch.tmpSizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
- name: cache
  emptyDir:
    {{- with $scratch.cacheSizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
{{- if eq $ctx.Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.source is pvc: set model.pvc.claimName" $ctx.Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq $ctx.Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.source is hostPath: set model.hostPath.path" $ctx.Values.model.hostPath.path }}
    type: Directory
{{- end }}
{{- if and $ctx.Values.secrets.apiKeys.enabled (eq $group "head") }}
- name: api-keys
  secret:
    secretName: {{ include "zayaserve.apiKeysSecret.name" $ctx }}
    items:
      - key: {{ include "zayaserve.apiKeysSecret.key" $ctx }}
        path: {{ include "zayaserve.apiKeysSecret.key" $ctx }}
{{- end }}
{{- if and (eq $group "head") $ctx.Values.rayAutoscaler.enabled }}
# The service-account token, for the autoscaler container alone (autoscalerOptions mounts
# it): what the kubelet would mount in every container with automountServiceAccountToken.
- name: kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end }}
{{- end -}}

{{/* The pod-level security of every Ray pod: no service-account token (nothing in a Ray
container calls the Kubernetes API; the head's autoscaler gets its own mount) and
podSecurityContext; on expert pods with pinned Ray ports, the ephemeral port range the shards'
RPC servers bind in (networkPolicy.expertRayPorts).
Call: include "zayaserve.podSecurity" (list $ "experts") */}}
{{- define "zayaserve.podSecurity" -}}
{{- $ctx := index . 0 -}}
{{- $security := deepCopy ($ctx.Values.podSecurityContext | default dict) -}}
{{- $ports := $ctx.Values.networkPolicy.expertRayPorts -}}
{{- if and (eq (index . 1) "experts") $ports.pinned -}}
{{- $range := printf "%d %d" (int $ports.shardPortRange.min) (int $ports.shardPortRange.max) -}}
{{- $sysctl := dict "name" "net.ipv4.ip_local_port_range" "value" $range -}}
{{- $_ := set $security "sysctls" (append ($security.sysctls | default list) $sysctl) -}}
{{- end }}
automountServiceAccountToken: false
{{- with $security }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* requests == limits, as Ray recommends (it reads its CPU and memory from the limits). */}}
{{- define "zayaserve.cpuMemory" -}}
cpu: {{ .cpu | quote }}
memory: {{ .memory | quote }}
{{- end -}}

{{/*
The pod template of a worker group, "attention" or "experts".
Call: include "zayaserve.workerTemplate" (list $ "attention")
*/}}
{{- define "zayaserve.workerTemplate" -}}
{{- $ctx := index . 0 -}}
{{- $name := index . 1 -}}
{{- $group := get $ctx.Values $name -}}
{{- $gpu := include "zayaserve.gpuResource" $ctx -}}
{{- $hasGpus := and (ne $gpu "") (gt (int $group.gpusPerPod) 0) -}}
{{- /* The vendor's default nodeSelector applies to groups with GPUs; the group's keys win. */ -}}
{{- $vendorSelector := ternary (dig $ctx.Values.gpu.vendor "nodeSelector" dict $ctx.Values.gpu) dict $hasGpus -}}
{{- $nodeSelector := merge (deepCopy ($group.nodeSelector | default dict)) $vendorSelector -}}
metadata:
  labels:
    {{- include "zayaserve.componentLabels" (list $ctx $name) | nindent 4 }}
    {{- with $group.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- include "zayaserve.podSecurity" (list $ctx $name) | nindent 2 }}
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-worker
      image: {{ include "zayaserve.image" $ctx }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      {{- with $ctx.Values.containerSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        {{- include "zayaserve.rayEnv" (list $ctx $name) | trim | nindent 8 }}
      resources:
        requests:
          {{- include "zayaserve.cpuMemory" $group.resources | nindent 10 }}
          {{- if $hasGpus }}
          {{ $gpu }}: {{ $group.gpusPerPod | quote }}
          {{- end }}
        limits:
          {{- include "zayaserve.cpuMemory" $group.resources | nindent 10 }}
          {{- if $hasGpus }}
          {{ $gpu }}: {{ $group.gpusPerPod | quote }}
          {{- end }}
      volumeMounts:
        {{- include "zayaserve.rayVolumeMounts" (list $ctx $name) | trim | nindent 8 }}
  volumes:
    {{- include "zayaserve.rayVolumes" (list $ctx $name $group.shmSize) | trim | nindent 4 }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
