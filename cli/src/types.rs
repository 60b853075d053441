//! `ember type`: volume types and extra specs, like `cinder type-*` and `type-key`.

use crate::connect::{CliError, ConnectArgs};
use crate::output;
use ember_proto::v1::volume_type_service_client::VolumeTypeServiceClient;
use ember_proto::v1::*;
use std::collections::HashMap;

/// `ember type …`
#[derive(Debug, clap::Args)]
pub struct TypeCmd {
    #[command(subcommand)]
    action: TypeAction,
}

#[derive(Debug, clap::Subcommand)]
enum TypeAction {
    /// Create a volume type.
    Create {
        /// Name.
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Extra spec `key=value` (repeatable).
        #[arg(long = "spec")]
        specs: Vec<String>,
        /// Make it the default type.
        #[arg(long)]
        default: bool,
        /// Make it private: only admins and the projects granted access (`ember type access add`) use it.
        #[arg(long, conflicts_with = "default")]
        private: bool,
    },
    /// List volume types.
    List,
    /// Show one type.
    Show {
        /// Id or name.
        type_: String,
    },
    /// Rename, describe or make default.
    Update {
        /// Id or name.
        type_: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// Make it the default type.
        #[arg(long)]
        default: bool,
        /// Make it public.
        #[arg(long, conflicts_with = "private")]
        public: bool,
        /// Make it private.
        #[arg(long)]
        private: bool,
    },
    /// Set extra specs `key=value`.
    Set {
        /// Id or name.
        type_: String,
        /// `key=value` pairs.
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Remove extra specs by key.
    Unset {
        /// Id or name.
        type_: String,
        /// Keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Delete a type (refused while volumes use it).
    Delete {
        /// Id or name.
        type_: String,
    },
    /// Which projects may use a private type.
    Access {
        #[command(subcommand)]
        action: AccessAction,
    },
}

#[derive(Debug, clap::Subcommand)]
enum AccessAction {
    /// Let a project use a private type.
    Add {
        /// Id or name.
        type_: String,
        /// The project.
        project: String,
    },
    /// Take a project's use of a private type away (its volumes of the type stay).
    Remove {
        /// Id or name.
        type_: String,
        /// The project.
        project: String,
    },
    /// The projects that may use a private type.
    List {
        /// Id or name.
        type_: String,
    },
}

/// Parses `key=value` pairs.
pub fn parse_pairs(pairs: &[String]) -> Result<HashMap<String, String>, CliError> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::Other(format!("{p:?} is not key=value")))
        })
        .collect()
}

fn specs_text(t: &VolumeType) -> String {
    let mut specs: Vec<_> = t.extra_specs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    specs.sort();
    specs.join(", ")
}

fn to_json(t: &VolumeType) -> serde_json::Value {
    serde_json::json!({
        "id": t.id, "name": t.name, "description": t.description, "is_default": t.is_default, "is_public": t.is_public,
        "extra_specs": t.extra_specs, "created_at": output::time(&t.created_at),
    })
}

fn print(types: &[VolumeType], json: bool) {
    if json {
        output::json(&serde_json::Value::Array(types.iter().map(to_json).collect()));
        return;
    }
    let rows: Vec<Vec<String>> = types
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                t.description.clone(),
                if t.is_default { "yes" } else { "" }.into(),
                if t.is_public { "yes" } else { "no" }.into(),
                specs_text(t),
            ]
        })
        .collect();
    output::table(&["ID", "Name", "Description", "Default", "Public", "Extra Specs"], &rows);
}

/// Runs `ember type …`.
pub async fn run(cmd: TypeCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let mut client = VolumeTypeServiceClient::new(conn.channel()?);
    let shown = match cmd.action {
        TypeAction::Create { name, description, specs, default, private } => client
            .create_volume_type(CreateVolumeTypeRequest {
                name,
                description,
                extra_specs: parse_pairs(&specs)?,
                make_default: default,
                private,
            })
            .await?
            .into_inner(),
        TypeAction::List => {
            let all = client.list_volume_types(ListVolumeTypesRequest {}).await?.into_inner();
            print(&all.volume_types, json);
            return Ok(());
        }
        TypeAction::Show { type_ } => {
            client.get_volume_type(GetVolumeTypeRequest { id_or_name: type_ }).await?.into_inner()
        }
        TypeAction::Update { type_, name, description, default, public, private } => {
            let is_public = (public || private).then_some(public);
            let req =
                UpdateVolumeTypeRequest { id_or_name: type_, name, description, make_default: default, is_public };
            client.update_volume_type(req).await?.into_inner()
        }
        TypeAction::Access { action } => {
            let access = match action {
                AccessAction::Add { type_, project } => {
                    client.add_type_access(TypeAccessRequest { id_or_name: type_, project }).await?
                }
                AccessAction::Remove { type_, project } => {
                    client.remove_type_access(TypeAccessRequest { id_or_name: type_, project }).await?
                }
                AccessAction::List { type_ } => {
                    client.list_type_access(ListTypeAccessRequest { id_or_name: type_ }).await?
                }
            }
            .into_inner();
            if json {
                output::json(
                    &serde_json::json!({ "volume_type_id": access.volume_type_id, "projects": access.projects }),
                );
            } else {
                output::table(&["Project"], &access.projects.iter().map(|p| vec![p.clone()]).collect::<Vec<_>>());
            }
            return Ok(());
        }
        TypeAction::Set { type_, specs } => client
            .set_extra_specs(SetExtraSpecsRequest { id_or_name: type_, extra_specs: parse_pairs(&specs)? })
            .await?
            .into_inner(),
        TypeAction::Unset { type_, keys } => {
            client.unset_extra_specs(UnsetExtraSpecsRequest { id_or_name: type_, keys }).await?.into_inner()
        }
        TypeAction::Delete { type_ } => {
            client.delete_volume_type(DeleteVolumeTypeRequest { id_or_name: type_.clone() }).await?;
            if json {
                output::json(&serde_json::json!({ "deleted": type_ }));
            } else {
                println!("deleted volume type {type_}");
            }
            return Ok(());
        }
    };
    print(&[shown], json);
    Ok(())
}
