# Loads a Vagrantfile through Vagrant's own loader and prints, as JSON, what each machine would get:
# box, hostname, private network, CPUs and memory per provider, and the Ansible provisioner's settings.
# Usage: ruby dump_config.rb PROJECT_DIR (needs vagrant and vagrant-libvirt installed; no VM is touched).
require "json"
require "vagrant"

env = Vagrant::Environment.new(cwd: ARGV.fetch(0), ui_class: Vagrant::UI::Silent)
machines = env.machine_names.map do |name|
  result = env.vagrantfile.machine_config(name, :libvirt, env.boxes, nil, false)
  errors = result[:config_errors]
  vm = result[:config].vm
  libvirt = vm.get_provider_config(:libvirt)
  # VirtualBox's cpus= and memory= become `VBoxManage modifyvm` arguments.
  modifyvm = vm.get_provider_config(:virtualbox).customizations.map { |_, args| args }
                .select { |args| args[0] == "modifyvm" }.to_h { |args| [args[2].delete_prefix("--"), args[3]] }
  providers = { "libvirt" => { "cpus" => libvirt.cpus, "memory" => libvirt.memory },
                "virtualbox" => { "cpus" => modifyvm["cpus"]&.to_i, "memory" => modifyvm["memory"]&.to_i,
                                  "name" => vm.get_provider_config(:virtualbox).name } }
  ansible = vm.provisioners.select { |p| p.type == :ansible }.map do |p|
    c = p.config
    { "playbook" => c.playbook, "limit" => c.limit, "config_file" => c.config_file, "groups" => c.groups,
      "host_vars" => c.host_vars, "compatibility_mode" => c.compatibility_mode }
  end
  {
    "name" => name.to_s, "box" => vm.box, "hostname" => vm.hostname, "primary" => env.primary_machine_name == name,
    "private_ips" => vm.networks.select { |type, _| type == :private_network }.map { |_, opts| opts[:ip] },
    "synced_folders" => vm.synced_folders.transform_values { |opts| opts[:disabled] ? "disabled" : opts[:guestpath] },
    "providers" => providers, "ansible" => ansible, "config_errors" => errors,
  }
end
puts JSON.generate({ "machines" => machines, "default_provider" => ENV["VAGRANT_DEFAULT_PROVIDER"],
                     "no_parallel" => ENV["VAGRANT_NO_PARALLEL"],
                     "fact_cache" => ENV["ANSIBLE_CACHE_PLUGIN_CONNECTION"] })
